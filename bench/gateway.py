"""What the gateway (issue 14) adds to a request: the same request through a gateway route whose
handler only forwards (`return await env.DATAPLANE.get("dataplane").fetch(request)`) and
through a static route to the same named instance, in the same run, on the same cluster.

The upstream is bench/dataplane.py's (bench/upstream.c, a keep-alive C server answering
"Hello, world\\n" on any path, in an image FROM scratch); the cluster is bench/dataplane.py's
(control plane on an embedded store, agent and edge as separate processes, --insecure unless
--tls), with one config holding both routes:
  static    /static   [[routes]] class_name = "Dataplane", instance = "header:X-Session-Id"
  gateway   /gateway  [[routes]] gateway = true, the handler above
Both requests carry the same header, so they differ only in what the edge does with them. With
one `wrk` thread: latency at 1 connection (mean, p50), req/s at --connections and the edge's CPU
per request there, each the median of --rounds interleaved rounds. Prints what the gateway adds,
the median of each round's difference: ms at 1 connection, and per request at --connections
(1/req/s and edge CPU). Everything it
starts it stops on exit, Ctrl-C included; traffic goes only to 127.0.0.1 and its own container.
Usage: python bench/gateway.py [--duration 5] [--connections 32] [--rounds 3] [--tls]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dataplane import (  # noqa: E402
    HEADERS,
    IMAGE,
    INSTANCE,
    UPSTREAM_SOURCE,
    WRK_REPORT,
    BenchCluster,
    Load,
    build_upstream_image,
    cpu_ticks,
    median_load,
    run_cleaning_up,
    wait_for_hello,
    wrk,
)

GOAL_ADDED_MS = 0.1  # issue 14: a forward-only handler costs at most this
FORWARD = f'''"""Forward-only: what the gateway itself costs."""


async def fetch(request, env):
    return await env.DATAPLANE.get("{INSTANCE}").fetch(request)
'''
CONFIG = f"""
[gateway]
module = "forward.py"

[[containers]]
class_name = "Dataplane"
image = "{IMAGE}"
instance_type = "standard-1"

[[routes]]
path = "/static"
class_name = "Dataplane"
instance = "header:X-Session-Id"

[[routes]]
path = "/gateway"
gateway = true
"""
ROUTES = {"static": "/static", "gateway": "/gateway"}


@dataclass(frozen=True)
class Round:
    one: Load  # at 1 connection
    many: Load  # at --connections
    edge_cpu_us: float  # the edge's CPU per request at --connections


def measure(url: str, edge_pid: int, connections: int, seconds: float, script: Path) -> Round:
    wrk(url, connections, min(1.0, seconds), HEADERS, script)  # warm pools and caches
    one = wrk(url, 1, seconds, HEADERS, script)
    before = cpu_ticks(edge_pid)
    many = wrk(url, connections, seconds, HEADERS, script)
    spent_s = (cpu_ticks(edge_pid) - before) / os.sysconf("SC_CLK_TCK")
    return Round(one, many, spent_s * 1e6 / (many.rps * seconds))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32, help="for the req/s column")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians kept")
    parser.add_argument("--tls", action="store_true", help="a secured cluster (mutual TLS)")
    args = parser.parse_args()
    if not 0.5 <= args.duration <= 120:
        parser.error("--duration: from 0.5 to 120 seconds")
    if not 1 <= args.connections <= 1000:
        parser.error("--connections: from 1 to 1000")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds: from 1 to 20")
    return args


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    client = docker.from_env()
    stack.callback(client.close)
    print(f"building {IMAGE} from {UPSTREAM_SOURCE.relative_to(ROOT)} ...", flush=True)
    build_upstream_image(client)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-gateway-"))
    stack.callback(shutil.rmtree, tmp, True)
    kind = "tls" if args.tls else "plain"
    cluster = BenchCluster(
        tmp / "cluster", secure=args.tls, node_id=f"gateway-{os.getpid()}-{kind}", config=CONFIG
    )
    # The module beside the config that names it, before Cluster.start deploys that config.
    cluster.tmp.mkdir(parents=True)
    (cluster.tmp / "forward.py").write_text(FORWARD)
    stack.callback(cluster.stop, client)
    print(f"starting a Portside cluster ({'mutual TLS' if args.tls else '--insecure'}) ...")
    cluster.start()
    for name, path in ROUTES.items():
        took = wait_for_hello(cluster.edge, HEADERS, timeout_s=60, path=path)
        print(f"  {name} route {path}: first answer after {took:.2f} s", flush=True)
    edge_pid, _agent_pid = cluster.hops()

    script = tmp / "report.lua"
    script.write_text(WRK_REPORT)
    load_before = os.getloadavg()
    rounds: dict[str, list[Round]] = {name: [] for name in ROUTES}
    for i in range(args.rounds):
        # Each route goes first in every other round: neither always follows the other.
        order = list(ROUTES.items())[:: 1 if i % 2 == 0 else -1]
        for name, path in order:
            print(f"measuring {name} (round {i + 1}/{args.rounds}) ...", flush=True)
            url = f"http://{cluster.edge}{path}"
            rounds[name].append(measure(url, edge_pid, args.connections, args.duration, script))
    print_results(args, rounds, load_before)


def print_results(
    args: argparse.Namespace, rounds: dict[str, list[Round]], load_before: tuple[float, ...]
) -> None:
    one = {name: median_load([r.one for r in got]) for name, got in rounds.items()}
    many = {name: median_load([r.many for r in got]) for name, got in rounds.items()}
    cpu = {name: statistics.median(r.edge_cpu_us for r in got) for name, got in rounds.items()}
    n = args.connections
    medians = f"the median of {args.rounds} interleaved rounds" if args.rounds > 1 else "1 round"
    print()
    print(
        f"one wrk thread, {args.duration:g} s per measurement, {medians}; {os.cpu_count()} cores; "
        f"{'mutual TLS' if args.tls else 'plaintext'} edge → agent; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    print(
        f"| route | mean / p50 / p99 ms at 1 conn | req/s at 1 | req/s at {n} "
        f"| ms per request at {n} (1 / req/s) | edge CPU µs per request at {n} |"
    )
    print("|---|---|---|---|---|---|")
    for name in ROUTES:
        o, m = one[name], many[name]
        print(
            f"| {name} | {o.mean_us / 1000:.3f} / {o.p50_us / 1000:.3f} / {o.p99_us / 1000:.3f} "
            f"| {o.rps:,.0f} | {m.rps:,.0f} | {1000 / m.rps:.3f} | {cpu[name]:.0f} |"
        )
    for name in ROUTES:
        for load, conns in ((one[name], 1), (many[name], n)):
            if load.errors or load.non2xx:
                print(
                    f"  ! {name} at {conns} conn: {load.errors} socket errors/timeouts, "
                    f"{load.non2xx} answers 4xx/5xx"
                )
    # Each round's difference, then their median: the two routes of a round ran back to back,
    # so what else the machine did then weighs on both alike.
    pairs = list(zip(rounds["static"], rounds["gateway"], strict=True))
    added_mean = statistics.median(g.one.mean_us - s.one.mean_us for s, g in pairs) / 1000
    added_p50 = statistics.median(g.one.p50_us - s.one.p50_us for s, g in pairs) / 1000
    per_request = statistics.median(1000 / g.many.rps - 1000 / s.many.rps for s, g in pairs)
    added_cpu = statistics.median(g.edge_cpu_us - s.edge_cpu_us for s, g in pairs)
    print(
        "the gateway adds (the median of each round's difference): "
        f"{added_mean:+.3f} ms mean, {added_p50:+.3f} ms p50 at 1 connection; "
        f"{per_request:+.3f} ms per request at {n} connections "
        f"({many['gateway'].rps / many['static'].rps:.2f}× the static route's req/s), "
        f"{added_cpu:+.0f} µs of edge CPU per request"
    )
    worst = max(added_mean, added_p50, per_request)
    verdict = "met" if worst <= GOAL_ADDED_MS else "NOT met"
    print(f"  goal: a forward-only handler adds ≤ {GOAL_ADDED_MS} ms: {verdict}")


def main() -> None:
    args = parse_args()
    # The daemons run `python -m portside`: from this checkout, like the code imported here.
    os.chdir(ROOT)
    run_cleaning_up(lambda stack: run(args, stack))


if __name__ == "__main__":
    main()
