"""Benchmark of a pool's reaction to load: from the start of a sustained over-target CPU load to
the first request answered by the extra instance the autoscaler adds, with the steps between.

Starts a control plane (embedded SQLite store), agents on 127.0.0.2 (fra) and 127.0.0.3 (ams)
and an edge on 127.0.0.1 as separate processes, like tests/e2e/harness.py, and deploys a pool of
lite instances (minimum 1, maximum 4, cpu_target 50, scale_down_delay 3s, concurrency_limit 1).
Each round: `--workers` clients loop GET /cgi-bin/burn?1 through the edge until a container
that did not exist at load start answers; then the load stops and the pool drains back to 1.
The default load (2 workers) holds the pool's one instance at its CPU quota, twice the target: a
burst, which the autoscaler's panic mode answers from one sample. `--workers 1 --duty 0.7` (each
worker idle 0.43 s after each 1 s request) holds it at about 70%: over the target but no burst,
answered by the stable rule (two samples in a row).
Usage: python bench/pool_reaction.py [--rounds R] [--workers W] [--duty D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.autoscaler import DEFAULT_TOLERANCE  # noqa: E402
from nodeagent.stats import CgroupSampler, cpu_percent  # noqa: E402
from portside.net import free_port  # noqa: E402
from tests.images.build import build_image  # noqa: E402

IMAGE = "portside-test/echo:latest"
CLASS = "BenchBurner"
CPU_TARGET = 50.0
CONFIG = f"""
[[containers]]
class_name = "{CLASS}"
image = "{IMAGE}"
instance_type = "lite"
entrypoint = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]

[containers.autoscaling]
minimum_instances = 1
maximum_instances = 4
cpu_target = {CPU_TARGET:g}
scale_down_delay = "3s"
concurrency_limit = 1

[[routes]]
path = "/cgi-bin"
class_name = "{CLASS}"
"""
ANCHORS = (
    "Kubernetes HPA: about 15-60 s from load to a new pod serving",
    "Knative autoscaler (KPA): decides on a 2 s tick, 6 s panic window",
)
STEPS = (
    ("cgroup", "container CPU over target (cgroup)"),
    ("gauge", "autoscaler tick sees it (gauge)"),
    ("decided", "autoscaler decision logged"),
    ("assigned", "agent starts the boot (ready - boot)"),
    ("created", "container created (docker)"),
    ("ready", "port answers (agent log)"),
    ("routed", "first request sent to it"),
    ("answered", "that request answered"),
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


def log_time(line: str) -> float | None:
    """The wall-clock time of a Portside log line ("2026-11-27 07:40:01,234 INFO ...")."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def docker_time(text: str) -> float:
    """Docker's RFC 3339 timestamps carry nanoseconds; datetime takes microseconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return stamp.timestamp() + float(f"0.{frac or 0}")


@dataclass
class Answer:
    sent: float
    answered: float
    hostname: str


@dataclass
class Load:
    """`workers` clients each looping GET /cgi-bin/burn?1 through the edge, bounded in time, each
    idle after every request for as long as makes it busy `duty` of the time."""

    edge: str
    workers: int
    limit_s: float
    duty: float = 1.0
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            sent = time.time()
            async with session.get(f"http://{self.edge}/cgi-bin/burn?1") as resp:
                text = await resp.text()
            if resp.status == 200:
                self.answers.append(Answer(sent, time.time(), text.split()[0]))
            else:
                self.errors.append(f"{resp.status} {text.strip()}")
            if self.duty < 1:
                idle = (time.time() - sent) * (1 - self.duty) / self.duty
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), idle)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session) for _ in range(self.workers)))


async def over_target(
    metrics: str, container: docker.models.containers.Container, stop: asyncio.Event
) -> dict[str, float]:
    """When the pool's CPU went over the target's tolerance band, seen from two places: the
    loaded container's cgroup counters (read here every 0.2 s, as the agent reads them every 1 s)
    and the control plane's pool utilisation gauge (set by each autoscaler tick, one a sample)."""
    threshold = CPU_TARGET * (1 + DEFAULT_TOLERANCE)
    vcpu = float(container.labels["portside.vcpu"])
    sampler = CgroupSampler()
    pid = {container.id: int(container.attrs["State"]["Pid"])}
    sampler.sample(pid)
    seen: dict[str, float] = {}
    gauge = re.compile(
        rf'^portside_controlplane_pool_cpu_utilisation_percent{{class="{CLASS}"}} (\S+)$', re.M
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stop.is_set() and len(seen) < 2:
            if "cgroup" not in seen:
                usage = sampler.sample(pid).get(container.id)
                if usage is not None and (cpu_percent(usage, vcpu) or 0) > threshold:
                    seen["cgroup"] = time.time()
            if "gauge" not in seen:
                async with session.get(f"http://{metrics}/metrics") as resp:
                    found = gauge.search(await resp.text())
                if found and float(found.group(1)) > threshold:
                    seen["gauge"] = time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    return seen


async def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.25)


class Bench:
    def __init__(
        self, tmp: Path, tag: str, client: docker.DockerClient, workers: int, duty: float
    ) -> None:
        self.tmp, self.tag, self.client = tmp, tag, client
        self.workers, self.duty = workers, duty
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.edge = ""
        self.metrics = ""
        self.rng = random.Random(0)

    def start(self, name: str, args: list[str], address: str) -> None:
        popen = subprocess.Popen(
            [sys.executable, "-m", "portside", *args],
            stdout=(self.tmp / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        self.procs[name] = popen
        wait_port(address, popen)

    def log(self, name: str) -> list[str]:
        return (self.tmp / f"{name}.log").read_text(errors="replace").splitlines()

    def pool(self) -> list[docker.models.containers.Container]:
        """The pool's running containers on this benchmark's nodes."""
        while True:
            try:
                found = self.client.containers.list(filters={"label": f"portside.class={CLASS}"})
            except docker.errors.NotFound:
                continue  # one was removed between the listing and its inspection: list again
            return [c for c in found if c.labels["portside.node"].startswith(self.tag + "-")]

    def start_cluster(self) -> None:
        cp = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.start(
            "controlplane",
            [
                "controlplane",
                "--listen",
                cp,
                "--store",
                f"sqlite://{self.tmp}/store.db",
                "--metrics-listen",
                self.metrics,
                "--insecure",  # it measures the autoscaler, not TLS (bench/named_instances.py does)
            ],
            cp,
        )
        (self.tmp / "portside.toml").write_text(CONFIG)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "portside",
                "deploy",
                str(self.tmp / "portside.toml"),
                "--controlplane",
                cp,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for region, host in (("fra", "127.0.0.2"), ("ams", "127.0.0.3")):
            listen = f"{host}:{free_port(host)}"
            self.start(
                f"agent-{region}",
                [
                    "agent",
                    "--controlplane",
                    cp,
                    "--listen",
                    listen,
                    "--api-listen",
                    f"{host}:{free_port(host)}",
                    "--region",
                    region,
                    "--node-id",
                    f"{self.tag}-{region}",
                ],
                listen,
            )
        self.edge = f"127.0.0.1:{free_port()}"
        self.start(
            "edge",
            [
                "edge",
                "--controlplane",
                cp,
                "--listen",
                self.edge,
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                "--region",
                "fra",
            ],
            self.edge,
        )

    def stop(self) -> None:
        for popen in reversed(self.procs.values()):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen in self.procs.values():
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        # Agents leave their containers for the next agent to adopt: there is none, remove them.
        for c in self.client.containers.list(all=True, filters={"label": "portside.node"}):
            if c.labels.get("portside.node", "").startswith(self.tag + "-"):
                c.remove(force=True)

    def added(self, since: float) -> list[tuple[float, str]]:
        """(time, instance name) of every instance the autoscaler added since `since`."""
        out = []
        for line in self.log("controlplane"):
            found = re.search(rf"autoscaler {CLASS}: added (\S+) on", line)
            at = log_time(line)
            if found and at is not None and at >= since:
                out.append((at, found.group(1)))
        return out

    def decision_line(self, since: float) -> str:
        for line in self.log("controlplane"):
            at = log_time(line)
            if at is not None and at >= since and re.search(r"desired [2-9]", line):
                return line.split(f"autoscaler {CLASS}: ", 1)[-1]
        return "?"

    def booted(self, name: str) -> tuple[float, float] | None:
        """(time the port answered, boot ms as the agent measured it) for pool instance `name`."""
        for region in ("fra", "ams"):
            for line in self.log(f"agent-{region}"):
                found = re.search(rf"booted {CLASS}/{re.escape(name)} in (\d+) ms", line)
                at = log_time(line)
                if found and at is not None:
                    return at, float(found.group(1))
        return None

    async def round(self, n: int) -> dict[str, float]:
        await wait_until("the pool is at 1", lambda: len(self.pool()) == 1, 60)
        # The agent samples CPU every second: start the load at a random phase of that clock, or
        # rounds of equal length would all hit the same phase.
        await asyncio.sleep(self.rng.uniform(0, 1))
        (loaded,) = await asyncio.to_thread(self.pool)
        before = {loaded.id[:12]}
        load = Load(self.edge, self.workers, limit_s=60, duty=self.duty)
        stop_watch = asyncio.Event()
        start = time.time()
        watch = asyncio.create_task(over_target(self.metrics, loaded, stop_watch))
        task = asyncio.create_task(load.run())
        try:
            deadline = time.monotonic() + 60
            while not any(a.hostname not in before for a in load.answers):
                if task.done() or time.monotonic() > deadline:
                    raise RuntimeError(f"round {n}: no second container answered within 60 s")
                await asyncio.sleep(0.02)
        finally:
            load.stop.set()
            stop_watch.set()
            await task
        seen = await watch
        if load.errors:
            raise RuntimeError(f"round {n}: errors under load: {load.errors[:5]}")
        first = next(a for a in load.answers if a.hostname not in before)
        (container,) = [
            c for c in await asyncio.to_thread(self.pool) if c.id[:12] == first.hostname
        ]
        name = container.labels["portside.instance"]
        decided = next((at for at, added in self.added(start) if added == name), None)
        booted = self.booted(name)
        times = {
            **seen,
            "decided": decided,
            "created": docker_time(container.attrs["Created"]),
            "ready": booted[0] if booted else None,
            "routed": first.sent,
            "answered": first.answered,
        }
        if booted:
            # The agent times a boot from the moment it takes the assignment (pushed by the
            # leader, or in a heartbeat reply).
            times["assigned"] = booted[0] - booted[1] / 1000
        out = {k: v - start for k, v in times.items() if v is not None}
        if booted:
            out["boot_ms"] = booted[1]
        print(
            f"  round {n}: answered by the new instance after {out['answered']:.2f} s "
            f"(" + ", ".join(f"{k} {out[k]:.2f}" for k, _ in STEPS if k in out) + ")"
        )
        print(f"    decision: {self.decision_line(start)}")
        # Let the pool drain back to its minimum before the next round.
        await wait_until("the pool returns to 1", lambda: len(self.pool()) == 1, 60)
        return out


async def run_rounds(bench: Bench, rounds: int) -> list[dict[str, float]]:
    await wait_until("the minimum instance runs", lambda: len(bench.pool()) == 1, 60)
    # The first request through the edge proves the edge knows the member; it loads nothing.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        deadline = time.monotonic() + 30
        while True:
            async with session.get(f"http://{bench.edge}/cgi-bin/whoami") as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the edge does not serve the pool")
            await asyncio.sleep(0.2)
    # A few idle CPU samples (every second) so the first round starts, like the others, from idle.
    await asyncio.sleep(3)
    return [await bench.round(n + 1) for n in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duty", type=float, default=1.0, help="each worker's busy share")
    args = parser.parse_args()
    client = docker.from_env()
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-pool-"))
    bench = Bench(tmp, f"bench-pool{os.getpid()}", client, args.workers, args.duty)
    started = time.monotonic()
    try:
        bench.start_cluster()
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(
            f"pool {CLASS}: lite, minimum 1, maximum 4, cpu_target {CPU_TARGET:g}, "
            f"scale_down_delay 3s, concurrency_limit 1; load: {args.workers} workers "
            f"GET /cgi-bin/burn?1, busy {args.duty:.0%} of the time"
        )
        results = asyncio.run(run_rounds(bench, args.rounds))
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        bench.stop()
        client.close()
    shutil.rmtree(tmp, ignore_errors=True)

    total = [r["answered"] for r in results]
    print(
        f"load start -> answered by a second instance: median {statistics.median(total):.2f} s, "
        f"min {min(total):.2f} s, max {max(total):.2f} s (n={len(total)})"
    )
    print("breakdown: median seconds after load start, and median of the step from the one before")
    previous = ""
    for key, what in STEPS:
        values = [r[key] for r in results if key in r]
        steps = [r[key] - r[previous] for r in results if key in r and previous in r]
        if values:
            step = f"{statistics.median(steps):+.2f}" if steps else ""
            print(f"  {what:<40} {statistics.median(values):6.2f} {step:>7}  (n={len(values)})")
        previous = key
    boots = [r["boot_ms"] for r in results if "boot_ms" in r]
    if boots:
        print(f"  boot as the agent measured it: median {statistics.median(boots):.0f} ms")
    print("anchors (published figures):")
    for anchor in ANCHORS:
        print(f"  {anchor}")
    print(f"wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
