"""Soak under churn, bounded in time: many clients for minutes across 2 edges and 2 agents, named
instances that sleep and wake constantly, and a pool scaled up and down by alternating load.

Starts a control plane on the etcd given by --etcd (its /portside/ keys must be empty: the
benchmark bootstraps a cluster there and deletes its keys at the end), agents on 127.0.0.2 (fra)
and 127.0.0.3 (ams) and edges on 127.0.0.1 (fra) and 127.0.0.4 (ams), secured like a user's
cluster, as separate processes. All traffic stays on loopback.

Load: --clients asyncio clients (aiohttp), started over --ramp seconds, work on --names named
instances (sleep_after --sleep-after), each name always through the same edge. A client takes
its names in turn: a session of GETs (--think seconds apart) for --session seconds, then a pause
of sleep_after plus --pause seconds, so that the name sleeps and its next session wakes it.
Meanwhile the pool gets --pool-clients workers burning CPU (GET /cgi-bin/burn?1) for --phase
seconds, then one light client for --phase seconds, over and over: it scales up and back down.

Reports requests, errors by status and Portside-Error kind, p50/p99 latency, boots, wakes, sleeps
and scale events, and each daemon's resident memory and open file descriptors at every
--sample-every seconds (the first is "minute 1") and at the end, with the growth between;
latencies also from the first sample on, when every name has booted once.
Usage: python bench/soak.py --etcd etcd://127.0.0.1:23795 [--minutes 10] [--clients 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import docker
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portside import headers  # noqa: E402
from portside.net import free_port  # noqa: E402
from tests.images.build import build_image  # noqa: E402

IMAGE = "portside-test/echo:latest"
NAMED = "SoakNamed"
POOL = "SoakPool"
AGENTS = (("fra", "127.0.0.2"), ("ams", "127.0.0.3"))
EDGES = (("fra", "127.0.0.1"), ("ams", "127.0.0.4"))
CONFIG = """
[[containers]]
class_name = "{named}"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "{sleep_after}"

[[containers]]
class_name = "{pool}"
image = "{image}"
instance_type = "lite"
entrypoint = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]

[containers.autoscaling]
minimum_instances = 1
maximum_instances = {pool_max}
cpu_target = 50
scale_down_delay = "5s"
concurrency_limit = 1

[[routes]]
path = "/session"
class_name = "{named}"
instance = "header:X-Session-Id"

[[routes]]
path = "/cgi-bin"
class_name = "{pool}"
"""


def wait_port(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
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


def etcdctl(etcd: str, *args: str) -> str:
    endpoint = etcd.removeprefix("etcd://")
    out = subprocess.run(
        ["etcdctl", "--endpoints", endpoint, *args], check=True, capture_output=True, text=True
    )
    return out.stdout


@dataclass(frozen=True)
class ProcSample:
    rss_mib: float
    fds: int


def proc_sample(pid: int) -> ProcSample:
    """Resident memory (VmRSS) and open file descriptors of a process, from /proc."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return ProcSample(rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    metrics: str


class Cluster:
    """The soak's processes, their logs in `tmp`, their containers labelled with `tag`."""

    def __init__(self, tmp: Path, tag: str, etcd: str, log_level: str) -> None:
        self.tmp, self.tag, self.etcd, self.log_level = tmp, tag, etcd, log_level
        self.daemons: list[Daemon] = []
        self.edges: list[str] = []
        self.controlplane = ""

    def spawn(self, name: str, args: list[str], address: str, metrics: str) -> None:
        popen = subprocess.Popen(
            [sys.executable, "-m", "portside", "--log-level", self.log_level, *args],
            stdout=(self.tmp / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        self.daemons.append(Daemon(name, popen, metrics))
        wait_port(address, popen)

    def start(self, config: str) -> None:
        py = [sys.executable, "-m", "portside"]
        tokens = self.tmp / "tokens"
        subprocess.run(
            [*py, "bootstrap", "--store", self.etcd, "--out", str(tokens)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        join = ["--join-token-file", str(tokens / "join.token")]
        self.controlplane = f"127.0.0.1:{free_port()}"
        metrics = f"127.0.0.1:{free_port()}"
        self.spawn(
            "controlplane",
            ["controlplane", "--listen", self.controlplane, "--store", self.etcd]
            + ["--metrics-listen", metrics],
            self.controlplane,
            metrics,
        )
        (self.tmp / "portside.toml").write_text(config)
        subprocess.run(
            [*py, "deploy", str(self.tmp / "portside.toml"), "--controlplane", self.controlplane]
            + ["--token-file", str(tokens / "admin.token")],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        for region, host in AGENTS:
            listen, metrics = f"{host}:{free_port(host)}", f"{host}:{free_port(host)}"
            self.spawn(
                f"agent-{region}",
                ["agent", "--controlplane", self.controlplane, "--listen", listen]
                + ["--api-listen", f"{host}:{free_port(host)}", "--metrics-listen", metrics]
                + ["--region", region, "--node-id", f"{self.tag}-{region}"]
                # Capacity is accounted by awake instances: room for every name and the pool.
                + ["--vcpu", "64", "--memory-mib", "1000000", *join],
                listen,
                metrics,
            )
        for region, host in EDGES:
            listen, metrics = f"{host}:{free_port(host)}", f"{host}:{free_port(host)}"
            self.spawn(
                f"edge-{region}",
                ["edge", "--controlplane", self.controlplane, "--listen", listen]
                + ["--metrics-listen", metrics, "--region", region, *join],
                listen,
                metrics,
            )
            self.edges.append(listen)

    def stop(self, client: docker.DockerClient) -> None:
        for d in reversed(self.daemons):
            if d.popen.poll() is None:
                d.popen.send_signal(signal.SIGTERM)
        for d in self.daemons:
            try:
                d.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(d.popen.pid, signal.SIGKILL)
                d.popen.wait()
        # Agents leave their containers for the next agent to adopt: there is none, remove them.
        for c in client.api.containers(all=True, filters={"label": "portside.node"}):
            if c["Labels"].get("portside.node", "").startswith(self.tag + "-"):
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(c["Id"], force=True)

    def running(self, client: docker.DockerClient, class_name: str) -> int:
        """The class's running containers on this soak's nodes (one list call)."""
        found = client.api.containers(filters={"label": f"portside.class={class_name}"})
        return sum(c["Labels"]["portside.node"].startswith(self.tag + "-") for c in found)

    def sample(self) -> dict[str, ProcSample]:
        return {d.name: proc_sample(d.popen.pid) for d in self.daemons if d.popen.poll() is None}

    def exited(self) -> list[str]:
        return [
            f"{d.name} ({d.popen.returncode})" for d in self.daemons if d.popen.poll() is not None
        ]


@dataclass
class Tally:
    """What the clients saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"named": [], "pool": []})
    # Those of requests sent from the first sample on ("minute 1"): the steady state, without
    # the first boot of every name.
    steady_from: float = float("inf")
    steady: dict[str, list[float]] = field(default_factory=lambda: {"named": [], "pool": []})
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    containers: dict[str, set[str]] = field(default_factory=dict)  # name -> hostnames answering

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + sum(self.errors.values())

    def error(self, what: str, example: str) -> None:
        self.errors[what] += 1
        self.examples.setdefault(what, example[:200])


async def timed_get(
    session: aiohttp.ClientSession,
    tally: Tally,
    kind: str,
    url: str,
    h: dict[str, str],
) -> str | None:
    """One GET; its latency or its error goes into `tally`. The body of a 200, else None."""
    began = time.perf_counter()
    try:
        async with session.get(url, headers=h) as resp:
            text = await resp.text()
            if resp.status != 200:
                tally.error(f"{kind} {resp.status} {resp.headers.get(headers.ERROR, '-')}", text)
                return None
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(f"{kind} client {type(exc).__name__}", str(exc))
        return None
    took = time.perf_counter() - began
    tally.latencies[kind].append(took)
    if time.monotonic() - took >= tally.steady_from:
        tally.steady[kind].append(took)
    return text


@dataclass(frozen=True)
class Shape:
    """The named-instance clients' rhythm (seconds)."""

    think: tuple[float, float]
    session: tuple[float, float]
    pause: tuple[float, float]  # added to sleep_after
    sleep_after: float


async def named_client(
    session: aiohttp.ClientSession,
    tally: Tally,
    edges: list[str],
    names: list[int],
    shape: Shape,
    ends: float,
    rng: random.Random,
) -> None:
    rng.shuffle(names)
    for i in itertools.cycle(names):  # in turn until the end
        edge = edges[i % len(edges)]  # a name always goes through one edge: placed near it
        name = f"soak-{i}"
        h = {"X-Session-Id": name}
        session_ends = time.monotonic() + rng.uniform(*shape.session)
        while time.monotonic() < min(session_ends, ends):
            text = await timed_get(session, tally, "named", f"http://{edge}/session/whoami", h)
            if text:
                tally.containers.setdefault(name, set()).add(text.split()[0])
            await asyncio.sleep(rng.uniform(*shape.think))
        pause = shape.sleep_after + rng.uniform(*shape.pause)
        if time.monotonic() + pause >= ends:
            return
        await asyncio.sleep(pause)


async def pool_load(
    session: aiohttp.ClientSession,
    tally: Tally,
    edges: list[str],
    workers: int,
    phase_s: float,
    ends: float,
    phases: list[tuple[float, str]],
) -> None:
    """High phases: `workers` loops of burn?1 (each holds a lite instance's whole CPU for 1 s);
    low phases: one loop of whoami every 0.5 s."""

    async def worker(n: int, until: float, heavy: bool) -> None:
        edge = edges[n % len(edges)]
        while time.monotonic() < until:
            path = "burn?1" if heavy else "whoami"
            await timed_get(session, tally, "pool", f"http://{edge}/cgi-bin/{path}", {})
            if not heavy:
                await asyncio.sleep(0.5)

    heavy = True
    while time.monotonic() < ends:
        until = min(ends, time.monotonic() + phase_s)
        phases.append((time.monotonic(), "high" if heavy else "low"))
        await asyncio.gather(*(worker(n, until, heavy) for n in range(workers if heavy else 1)))
        heavy = not heavy


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def scrape_totals(metrics: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of samples over their labels, from a daemon's /metrics."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in totals:
                totals[s.name] += s.value
    return totals


async def run(
    cluster: Cluster,
    client: docker.DockerClient,
    args: argparse.Namespace,
    shape: Shape,
) -> tuple[Tally, list[tuple[float, dict[str, ProcSample]]], float]:
    tally = Tally()
    samples: list[tuple[float, dict[str, ProcSample]]] = []
    phases: list[tuple[float, str]] = []
    duration = args.minutes * 60
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.monotonic()
        ends = began + duration
        by_client: list[list[int]] = [[] for _ in range(args.clients)]
        for i in range(args.names):
            by_client[i % args.clients].append(i)
        ramp = min(args.ramp, duration / 4)

        async def start_client(n: int) -> None:
            await asyncio.sleep(ramp * n / args.clients)  # no boot storm of every name at once
            await named_client(
                session,
                tally,
                cluster.edges,
                by_client[n],
                shape,
                ends,
                random.Random(rng.random()),
            )

        load = [asyncio.create_task(start_client(n)) for n in range(args.clients)]
        load.append(
            asyncio.create_task(
                pool_load(
                    session, tally, cluster.edges, args.pool_clients, args.phase, ends, phases
                )
            )
        )
        # Every sample_every seconds ("minute 1" first), and the end while still under load.
        marks = [args.sample_every * k for k in range(1, int(duration // args.sample_every) + 1)]
        marks = [m for m in marks if m < duration - 1]
        tally.steady_from = began + (marks[0] if marks else 0.0)
        last_requests, last_at = 0, began
        for mark in [*marks, duration - 0.5]:
            await asyncio.sleep(max(0.0, began + mark - time.monotonic()))
            at = time.monotonic() - began
            samples.append((at, cluster.sample()))
            pool = cluster.running(client, POOL)
            requests = tally.requests
            rate = (requests - last_requests) / (time.monotonic() - last_at)
            last_requests, last_at = requests, time.monotonic()
            named = tally.latencies["named"]
            print(
                f"  {at / 60:5.2f} min: {requests:,} requests ({rate:.0f}/s), "
                f"{sum(tally.errors.values())} errors, named p50 {percentile(named, 0.5) * 1e3:.1f}"
                f" ms p99 {percentile(named, 0.99) * 1e3:.1f} ms, pool containers {pool}, "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            if cluster.exited():
                raise RuntimeError(f"daemons exited: {', '.join(cluster.exited())}")
        await asyncio.gather(*load)
        wall = time.monotonic() - began
    print(
        "  pool phases: "
        + ", ".join(f"{kind} from {(at - began) / 60:.2f} min" for at, kind in phases[:8])
        + (" ..." if len(phases) > 8 else "")
    )
    return tally, samples, wall


def report(
    cluster: Cluster,
    tally: Tally,
    samples: list[tuple[float, dict[str, ProcSample]]],
    wall: float,
) -> None:
    print(
        f"requests: {tally.requests:,} in {wall:.0f} s ({tally.requests / wall:.0f}/s; the load "
        "stops at the set time, then the last requests are answered)"
    )
    first_min = samples[0][0] / 60
    for kind in tally.latencies:
        for when, values in (
            ("all", tally.latencies[kind]),
            ("from 1st sample", tally.steady[kind]),
        ):
            print(
                f"  {kind:5} {when:>15}: {len(values):,} answered 200, "
                f"p50 {percentile(values, 0.5) * 1e3:.1f} ms, "
                f"p99 {percentile(values, 0.99) * 1e3:.1f} ms, "
                f"max {max(values, default=0) * 1e3:.0f} ms"
            )
    print(f"  (the first sample: {first_min:.2f} min; before it every name boots a first time)")
    print(f"errors: {sum(tally.errors.values())}")
    for what, count in tally.errors.most_common():
        print(f"  {count:6} {what}: {tally.examples[what]!r}")
    moved = {n: c for n, c in tally.containers.items() if len(c) > 1}
    print(
        f"named instances answered: {len(tally.containers)}; by more than one container: "
        f"{len(moved)}{' ' + str(sorted(moved)[:5]) if moved else ''}"
    )
    agents = [d for d in cluster.daemons if d.name.startswith("agent")]
    counted = (
        "portside_agent_boots_total",
        "portside_agent_wakes_total",
        "portside_agent_sleeps_total",
    )
    totals = collections.Counter[str]()
    for d in agents:
        totals.update(scrape_totals(d.metrics, counted))
    cp = next(d for d in cluster.daemons if d.name == "controlplane")
    scale = scrape_totals(cp.metrics, ("portside_controlplane_scale_events_total",))
    print(
        f"agents: {totals['portside_agent_boots_total']:.0f} boots "
        f"({totals['portside_agent_wakes_total']:.0f} of them wakes), "
        f"{totals['portside_agent_sleeps_total']:.0f} sleeps; "
        f"pool scale events: {scale['portside_controlplane_scale_events_total']:.0f}"
    )
    (first_at, first), (last_at, last) = samples[0], samples[-1]
    print(
        f"daemons at {first_at / 60:.2f} min and at the end ({last_at / 60:.2f} min): "
        "resident memory MiB, open fds"
    )
    for name in first:
        a, b = first[name], last.get(name)
        if b is None:
            print(f"  {name:14} {a.rss_mib:7.1f} -> gone")
            continue
        print(
            f"  {name:14} {a.rss_mib:7.1f} -> {b.rss_mib:7.1f} MiB ({b.rss_mib - a.rss_mib:+.1f}), "
            f"{a.fds:4} -> {b.fds:4} fds ({b.fds - a.fds:+d})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", required=True, help="etcd://HOST:PORT with no /portside/ keys")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--names", type=int, default=200, help="named instances")
    parser.add_argument("--sleep-after", type=float, default=2.0, help="seconds (2)")
    parser.add_argument("--think", type=float, nargs=2, default=(0.5, 1.5), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--session",
        type=float,
        nargs=2,
        # 200 names: about 2 wakes and 2 sleeps a second, each name every 1.5 minutes. dockerd on
        # 2 busy cores started and stopped about 4 containers a second in parallel.
        default=(60.0, 120.0),
        metavar=("MIN", "MAX"),
    )
    parser.add_argument("--pause", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--ramp", type=float, default=30.0, help="seconds over which the clients start (30)"
    )
    parser.add_argument("--pool-clients", type=int, default=4, help="workers in a high phase")
    parser.add_argument("--pool-max", type=int, default=6)
    parser.add_argument("--phase", type=float, default=60.0, help="seconds per pool load phase")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds (60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="warning", help="of the daemons (warning)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs")
    args = parser.parse_args()
    if not args.etcd.startswith("etcd://"):
        parser.error("--etcd takes etcd://HOST:PORT")
    if etcdctl(args.etcd, "get", "--prefix", "/portside/", "--keys-only", "--limit", "1").strip():
        parser.error(f"{args.etcd} holds /portside/ keys: give the soak an etcd of its own")
    shape = Shape(
        (args.think[0], args.think[1]),
        (args.session[0], args.session[1]),
        (args.pause[0], args.pause[1]),
        args.sleep_after,
    )
    client = docker.from_env()
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-soak-"))
    cluster = Cluster(tmp, f"soak{os.getpid()}-{secrets.token_hex(2)}", args.etcd, args.log_level)
    config = CONFIG.format(
        named=NAMED,
        pool=POOL,
        image=IMAGE,
        sleep_after=f"{args.sleep_after:g}s",
        pool_max=args.pool_max,
    )
    try:
        cluster.start(config)
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(
            f"soak: {args.minutes:g} min, {args.clients} clients on {args.names} named instances "
            f"(sleep_after {args.sleep_after:g}s; sessions {args.session[0]:g}-{args.session[1]:g}"
            f" s, GETs {args.think[0]:g}-{args.think[1]:g} s apart, pauses sleep_after + "
            f"{args.pause[0]:g}-{args.pause[1]:g} s), pool {POOL} 1-{args.pool_max} "
            f"({args.pool_clients} burn workers / 1 light client, {args.phase:g} s phases), "
            f"2 edges, 2 agents"
        )
        tally, samples, wall = asyncio.run(run(cluster, client, args, shape))
        report(cluster, tally, samples, wall)
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        cluster.stop(client)
        client.close()
        etcdctl(args.etcd, "del", "--prefix", "/portside/")
    if args.keep_logs:
        print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
