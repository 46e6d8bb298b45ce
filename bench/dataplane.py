"""The data plane's warm path (issue 11): what Portside's two hops, edge → node agent → container,
add to a request, against nginx doing the same two hops on this machine, in the same run.

Builds the upstream, bench/upstream.c (a keep-alive HTTP/1.1 server answering "Hello, world\\n",
WebSocket echo on /ws), with `gcc -O2 -static` into an image FROM scratch, and runs it on a Docker
network of its own. Then, with one `wrk` thread (latency at 1 connection, req/s at 1 and at
--connections), measures in turn:
  straight        wrk → the container
  nginx           nginx A → nginx B → the container (two nginx processes, one worker each,
                  upstream keep-alive), plaintext
  portside        Portside edge → agent → the container, a cluster started with --insecure
  relay           bench/relay.py A → relay B → the container: the leanest Python relay (uvloop,
                  llhttp, pooled keep-alive), with none of Portside's features: the floor of a
                  Python hop here
  nginx-tls       nginx A → nginx B over mutual TLS (proxy_ssl, session reuse, the same kind of
                  certificates as Portside's: a CA, P-256 keys, names verified both ways)
  portside-tls    Portside edge → agent over mutual TLS, a cluster secured like `portside up`
For every row with proxies, the CPU each hop's processes spent per request at --connections
(from /proc, children included: nginx's workers, an edge's --workers). And WebSocket echo
messages/s from one Python client process (aiohttp, --ws-clients connections
each sending a message and awaiting its echo): ws-straight, ws-portside, ws-portside-tls.
Each Portside cluster is real separate processes (bench/named_instances.py's Cluster: control
plane on an embedded store, agent, edge); the first request boots the instance, then it is warm.
Both nginx keep every connection (keepalive_requests raised), as Portside does. Everything it
starts it stops on exit, Ctrl-C included; traffic goes only to 127.0.0.1 and its own containers.
Usage: python bench/dataplane.py [--duration 5] [--connections 32] [--rounds 1] [--only NAME,...]
                                 [--workers N] [--ws-clients 8] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import docker
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.named_instances import Cluster, container_ip, wait_port  # noqa: E402
from portside import pki  # noqa: E402
from portside.net import free_port  # noqa: E402

IMAGE = "portside-bench/upstream:latest"
UPSTREAM_SOURCE = Path(__file__).resolve().parent / "upstream.c"
BODY = b"Hello, world\n"
INSTANCE = "dataplane"  # the named instance every request through Portside goes to
WRK = "/usr/bin/wrk"
NGINX = "/usr/sbin/nginx"
HTTP_ROWS = ("straight", "nginx", "relay", "portside", "nginx-tls", "portside-tls")
WS_ROWS = ("ws-straight", "ws-portside", "ws-portside-tls")
# The goal of issue 11, checked against every Portside row.
GOAL_ADDED_MS = 0.15
GOAL_P99_MS = 1.0
GOAL_VS_NGINX = 0.8

CONFIG = f"""
[[containers]]
class_name = "Dataplane"
image = "{IMAGE}"
instance_type = "standard-1"
[[routes]]
path = "/"
class_name = "Dataplane"
instance = "header:X-Session-Id"
"""
HEADERS = {"X-Session-Id": INSTANCE}

# wrk's own summary, exact and in µs, on one line (its --latency output rounds to 2 digits).
WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "DATAPLANE requests=%d duration_us=%d mean_us=%.2f p50_us=%d p99_us=%d errors=%d non2xx=%d\\n",
    summary.requests, summary.duration, latency.mean, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""
_WRK_LINE = re.compile(
    r"DATAPLANE requests=(\d+) duration_us=(\d+) mean_us=([\d.]+) p50_us=(\d+) p99_us=(\d+) "
    r"errors=(\d+) non2xx=(\d+)"
)


# -- the upstream ---------------------------------------------------------------------------


def build_upstream_image(client: docker.DockerClient) -> None:
    """Compile bench/upstream.c statically and build it into IMAGE, FROM scratch."""
    with tempfile.TemporaryDirectory(prefix="portside-bench-upstream-") as context:
        subprocess.run(
            ["gcc", "-O2", "-static", "-o", f"{context}/upstream", str(UPSTREAM_SOURCE)],
            check=True,
        )
        Path(context, "Dockerfile").write_text(
            'FROM scratch\nCOPY upstream /upstream\nEXPOSE 8080\nCMD ["/upstream"]\n'
        )
        client.images.build(path=context, tag=IMAGE, rm=True, forcerm=True)


def get(address: str, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_hello(
    address: str, headers: dict[str, str], timeout_s: float, path: str = "/"
) -> float:
    """GET `path` until the upstream's answer comes back (through Portside the first one boots
    the instance; before the edge has the deployed routes it may answer otherwise); its
    seconds."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            status, body = get(address, path, headers)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200 and body == BODY:
                return time.monotonic() - start
            last = f"{status} {body[:200]!r}"
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not answer with the upstream's body: {last}")


# -- nginx, the same two hops -----------------------------------------------------------------


def write_certificates(tmp: Path) -> None:
    """A CA, a server certificate for nginx B and a client certificate for nginx A, made like
    Portside's (portside.pki): P-256 keys, B named `portside-agent`, both signed by the CA."""
    now = time.time()
    ca = pki.CertificateAuthority.create("dataplane-bench", now)
    (tmp / "ca.pem").write_bytes(ca.cert_pem)
    for name, peer in (
        ("b", pki.Peer(pki.PeerRole.AGENT, "nginx-b")),
        ("a", pki.Peer(pki.PeerRole.EDGE, "nginx-a")),
    ):
        key = pki.new_key()
        (tmp / f"{name}.key").write_bytes(key)
        (tmp / f"{name}.pem").write_bytes(ca.issue(pki.signing_request(key), peer, now))


def nginx_config(tmp: Path, name: str, servers: str) -> Path:
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp}/{name}-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    path = tmp / f"{name}.conf"
    path.write_text(
        f"""worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{temp_paths}
{textwrap.indent(servers, "  ")}
}}
"""
    )
    return path


_PROXY = """proxy_http_version 1.1;
proxy_set_header Connection "";"""


@dataclass
class Nginx:
    """nginx A (plain_port → B, tls_port → B over mutual TLS) and nginx B (→ the container)."""

    tmp: Path
    upstream: str  # the container, HOST:PORT
    plain_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        write_certificates(self.tmp)
        b_plain, b_tls = free_port(), free_port()
        t = self.tmp
        b = nginx_config(
            t,
            "b",
            f"""upstream container {{ server {self.upstream}; keepalive 64;
  keepalive_requests 1000000; }}
server {{
  listen 127.0.0.1:{b_plain};
  location / {{ proxy_pass http://container; {_PROXY} }}
}}
server {{
  listen 127.0.0.1:{b_tls} ssl;
  ssl_certificate {t}/b.pem;
  ssl_certificate_key {t}/b.key;
  ssl_client_certificate {t}/ca.pem;
  ssl_verify_client on;
  location / {{ proxy_pass http://container; {_PROXY} }}
}}""",
        )
        a = nginx_config(
            t,
            "a",
            f"""upstream b_plain {{ server 127.0.0.1:{b_plain}; keepalive 64;
  keepalive_requests 1000000; }}
upstream b_tls {{ server 127.0.0.1:{b_tls}; keepalive 64; keepalive_requests 1000000; }}
server {{
  listen 127.0.0.1:{self.plain_port};
  location / {{ proxy_pass http://b_plain; {_PROXY} }}
}}
server {{
  listen 127.0.0.1:{self.tls_port};
  location / {{
    proxy_pass https://b_tls; {_PROXY}
    proxy_ssl_session_reuse on;
    proxy_ssl_certificate {t}/a.pem;
    proxy_ssl_certificate_key {t}/a.key;
    proxy_ssl_trusted_certificate {t}/ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_name portside-agent;
  }}
}}""",
        )
        for conf, ports in ((b, (b_plain, b_tls)), (a, (self.plain_port, self.tls_port))):
            name = conf.stem
            self.procs.append(
                subprocess.Popen(
                    [NGINX, "-p", str(t), "-c", str(conf), "-e", f"{t}/{name}.error.log"],
                    start_new_session=True,
                )
            )
            for port in ports:
                try:
                    wait_port("127.0.0.1", port, timeout_s=10)
                except RuntimeError:
                    log = (t / f"{name}.error.log").read_text(errors="replace")
                    raise RuntimeError(f"nginx {name} did not start:\n{log}") from None

    def hops(self) -> tuple[int, ...]:
        """The masters of A and B (their workers are counted under them)."""
        return tuple(p.pid for p in reversed(self.procs))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)  # nginx: fast shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            kill_group(p)


def kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL to a process started in a session of its own and to its children (nginx's
    workers, an edge's --workers), if it is still there."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@dataclass
class Relays:
    """bench/relay.py A (port) → relay B → the container."""

    upstream: str  # the container, HOST:PORT
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        b_port = free_port()
        for listen, upstream in ((b_port, self.upstream), (self.port, f"127.0.0.1:{b_port}")):
            argv = [sys.executable, str(ROOT / "bench" / "relay.py"), "--listen", str(listen)]
            self.procs.append(
                subprocess.Popen([*argv, "--upstream", upstream], start_new_session=True)
            )
            wait_port("127.0.0.1", listen, timeout_s=10)
        self.procs.reverse()  # A first, as the hops are counted

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            kill_group(p)


# -- CPU per request --------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def cpu_ticks(root: int) -> int:
    """utime + stime of `root` and every process under it, in clock ticks."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


# -- Portside ---------------------------------------------------------------------------------


@dataclass
class BenchCluster(Cluster):
    """named_instances' Cluster, with the edge's extra arguments (--workers) and the control
    plane's address remembered for deploying this benchmark's config."""

    edge_args: tuple[str, ...] = ()
    controlplane: str = ""

    def spawn(self, *argv: str) -> None:
        daemon = next((a for a in argv if a in ("controlplane", "agent", "edge")), "")
        if daemon == "controlplane":
            self.controlplane = argv[argv.index("--listen") + 1]
        elif daemon == "edge":
            argv = (*argv, *self.edge_args)
        super().spawn(*argv)

    def deploy(self, config_text: str, name: str) -> None:
        """Deploy `config_text` over the one Cluster.start deployed (a deploy replaces the
        whole config)."""
        config = self.tmp / f"{name}.toml"
        config.write_text(config_text)
        token = ["--token-file", str(self.tmp / "tokens" / "admin.token")] if self.secure else []
        subprocess.run(
            [sys.executable, "-m", "portside", "--log-level", "warning", "deploy", str(config)]
            + ["--controlplane", self.controlplane, *token],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def hops(self) -> tuple[int, ...]:
        """The edge's pid (its --workers under it), then the agent's."""
        daemons = {
            next(a for a in p.args if a in ("controlplane", "agent", "edge")): p.pid
            for p in self.procs
            if isinstance(p.args, list)
        }
        return daemons["edge"], daemons["agent"]

    def deploy_and_warm(self) -> float:
        """Deploy CONFIG and boot the instance with a first request; its seconds."""
        self.deploy(CONFIG, "dataplane")
        return wait_for_hello(self.edge, HEADERS, timeout_s=60)

    def stop(self, client: docker.DockerClient) -> None:
        super().stop(client)  # SIGTERM, up to 15 s each
        for p in self.procs:
            kill_group(p)


def edge_accepts_workers() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "portside", "edge", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "--workers" in out


# -- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One wrk run: latency in µs, throughput in requests a second."""

    mean_us: float
    p50_us: float
    p99_us: float
    rps: float
    errors: int  # connect, read, write errors and timeouts
    non2xx: int


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str], script: Path) -> Load:
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    found = _WRK_LINE.search(out)
    if found is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    requests, duration_us, mean, p50, p99, errors, non2xx = found.groups()
    return Load(
        mean_us=float(mean),
        p50_us=float(p50),
        p99_us=float(p99),
        rps=int(requests) / (int(duration_us) / 1e6),
        errors=int(errors),
        non2xx=int(non2xx),
    )


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    url: str
    headers: dict[str, str]
    compare_to: str = ""  # the nginx row its throughput is held against
    hops: tuple[int, ...] = ()  # the root pid of each hop's processes, first hop first


@dataclass(frozen=True)
class Measured:
    row: Row
    one: Load  # at 1 connection
    many: Load  # at --connections
    cpu_us: tuple[float, ...] = ()  # CPU per request of each hop, at --connections


def measure(row: Row, connections: int, seconds: float, script: Path) -> Measured:
    wrk(row.url, connections, min(1.0, seconds), row.headers, script)  # warm pools and caches
    one = wrk(row.url, 1, seconds, row.headers, script)
    before = [cpu_ticks(pid) for pid in row.hops]
    many = wrk(row.url, connections, seconds, row.headers, script)
    spent = [(cpu_ticks(pid) - b) * _TICK_S for pid, b in zip(row.hops, before, strict=True)]
    requests = many.rps * seconds
    return Measured(row, one, many, tuple(s * 1e6 / requests for s in spent))


def median_load(loads: list[Load]) -> Load:
    """Each figure's median over rounds (errors: their sum)."""
    return Load(
        mean_us=statistics.median(x.mean_us for x in loads),
        p50_us=statistics.median(x.p50_us for x in loads),
        p99_us=statistics.median(x.p99_us for x in loads),
        rps=statistics.median(x.rps for x in loads),
        errors=sum(x.errors for x in loads),
        non2xx=sum(x.non2xx for x in loads),
    )


def median_cpu(rounds: list[Measured]) -> tuple[float, ...]:
    return tuple(statistics.median(hop) for hop in zip(*(m.cpu_us for m in rounds), strict=True))


def print_table(results: dict[str, Measured], connections: int) -> None:
    straight = results.get("straight")

    def ms(us: float) -> str:
        return f"{us / 1000:.3f}"

    print(
        f"| path | mean / p50 / p99 ms at 1 conn | added ms (mean / p50) | req/s at 1 "
        f"| req/s at {connections} | × nginx (at 1 / at {connections}) "
        f"| CPU µs per request, hop 1 / hop 2 |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in results.values():
        one, many = m.one, m.many
        added = "—"
        if straight is not None and m.row.name != "straight":
            added_mean = (one.mean_us - straight.one.mean_us) / 1000
            added_p50 = (one.p50_us - straight.one.p50_us) / 1000
            added = f"{added_mean:+.3f} / {added_p50:+.3f}"
        ratio = "—"
        nginx = results.get(m.row.compare_to)
        if nginx is not None:
            ratio = f"{one.rps / nginx.one.rps:.2f}× / {many.rps / nginx.many.rps:.2f}×"
        cpu = " / ".join(f"{us:.0f}" for us in m.cpu_us) or "—"
        print(
            f"| {m.row.label} | {ms(one.mean_us)} / {ms(one.p50_us)} / {ms(one.p99_us)} "
            f"| {added} | {one.rps:,.0f} | {many.rps:,.0f} | {ratio} | {cpu} |"
        )
    for m in results.values():
        for load, conns in ((m.one, 1), (m.many, connections)):
            if load.errors or load.non2xx:
                print(
                    f"  ! {m.row.label} at {conns} conn: {load.errors} socket errors/timeouts, "
                    f"{load.non2xx} answers 4xx/5xx"
                )
    if straight is None:
        return
    for m in results.values():
        if not m.row.name.startswith("portside"):
            continue
        added_mean = (m.one.mean_us - straight.one.mean_us) / 1000
        added_p50 = (m.one.p50_us - straight.one.p50_us) / 1000
        checks = [
            (
                f"adds ≤ {GOAL_ADDED_MS} ms (mean and p50)",
                max(added_mean, added_p50) <= GOAL_ADDED_MS,
            ),
            (f"p99 ≤ {GOAL_P99_MS} ms", m.one.p99_us / 1000 <= GOAL_P99_MS),
        ]
        nginx = results.get(m.row.compare_to)
        if nginx is not None:
            checks.append(
                (
                    f"≥ {GOAL_VS_NGINX}× nginx at {connections} conn",
                    m.many.rps / nginx.many.rps >= GOAL_VS_NGINX,
                )
            )
        verdict = "; ".join(f"{what}: {'met' if ok else 'NOT met'}" for what, ok in checks)
        print(f"  goal, {m.row.label}: {verdict}")


# -- WebSocket echo ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Echoes:
    messages: int
    seconds: float
    client_cpu: float  # the client process's CPU seconds per wall second (1.0: one core busy)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def ws_echoes(url: str, headers: dict[str, str], clients: int, seconds: float) -> Echoes:
    """`clients` WebSockets, each sending a 32-byte text message and awaiting its echo, over
    and over for `seconds` (all connected before the clock starts)."""
    message = "x" * 32
    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(url, headers=headers, timeout=aiohttp.ClientWSTimeout(10))
            for _ in range(clients)
        ]
        try:
            for ws in sockets:  # one round trip each first: every hop's connection is warm
                await ws.send_str(message)
                await ws.receive(timeout=10)
            deadline = time.monotonic() + seconds

            async def echo(ws: aiohttp.ClientWebSocketResponse) -> int:
                count = 0
                while time.monotonic() < deadline:
                    await ws.send_str(message)
                    reply = await ws.receive(timeout=10)
                    if reply.type != aiohttp.WSMsgType.TEXT or reply.data != message:
                        raise RuntimeError(f"{url}: echo expected, got {reply.type} {reply.data}")
                    count += 1
                return count

            start, cpu = time.monotonic(), time.process_time()
            counts = await asyncio.gather(*(echo(ws) for ws in sockets))
            elapsed = time.monotonic() - start
            return Echoes(sum(counts), elapsed, (time.process_time() - cpu) / elapsed)
        finally:
            for ws in sockets:
                await ws.close()


def print_ws(results: dict[str, tuple[str, Echoes]], clients: int) -> None:
    straight = results.get("ws-straight")
    print(
        f"WebSocket echo, {clients} connections from one Python client process (aiohttp), "
        "32-byte text messages, each awaiting its echo before the next:"
    )
    print("| path | messages/s | × straight | client CPU (cores) |")
    print("|---|---|---|---|")
    for label, echoes in results.values():
        ratio = f"{echoes.rate / straight[1].rate:.2f}×" if straight else "—"
        print(f"| {label} | {echoes.rate:,.0f} | {ratio} | {echoes.client_cpu:.2f} |")
    busy = [label for label, e in results.values() if e.client_cpu >= 0.85]
    if busy:
        print(
            f"  ! the client used ≥ 0.85 of a core on: {', '.join(busy)} — there the Python "
            "client, not the path, may be the limit (the × straight ratio is then an upper bound)"
        )


# -- the run ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32, help="for the req/s column")
    parser.add_argument(
        "--only",
        default=",".join(HTTP_ROWS + WS_ROWS),
        help=f"comma-separated rows: {', '.join(HTTP_ROWS + WS_ROWS)} (default: all)",
    )
    parser.add_argument("--workers", type=int, help="pass `--workers N` to each `portside edge`")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the HTTP rows this many times, interleaved, and report each figure's median",
    )
    parser.add_argument("--ws-clients", type=int, default=8, help="WebSocket connections")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="after measuring, keep everything running until Ctrl-C or SIGTERM (prints pids)",
    )
    args = parser.parse_args()
    if not 0.5 <= args.duration <= 120:
        parser.error("--duration: from 0.5 to 120 seconds")
    if not 1 <= args.connections <= 1000:
        parser.error("--connections: from 1 to 1000")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds: from 1 to 20")
    if not 1 <= args.ws_clients <= 256:
        parser.error("--ws-clients: from 1 to 256")
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers: from 1 to 64")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(HTTP_ROWS + WS_ROWS))
    if unknown or not only:
        parser.error(f"--only: {unknown or 'nothing'}; choose from {HTTP_ROWS + WS_ROWS}")
    args.only = only
    return args


@contextlib.contextmanager
def upstream_container(client: docker.DockerClient) -> Iterator[str]:
    """The upstream on a Docker network of the benchmark's own (internal: no route out); its
    HOST:PORT as the host reaches it."""
    name = f"portside-bench-dataplane-{os.getpid()}"
    network = client.networks.create(name, driver="bridge", internal=True)
    try:
        container = client.containers.run(IMAGE, detach=True, name=name, network=name)
        try:
            container.reload()
            ip = container.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
            wait_port(ip, 8080, timeout_s=10)
            yield f"{ip}:8080"
        finally:
            container.remove(force=True)
    finally:
        network.remove()


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    only: list[str] = args.only
    edge_args: tuple[str, ...] = ()
    if args.workers is not None:
        if not edge_accepts_workers():
            raise SystemExit(
                "--workers: this checkout's `portside edge` has no --workers option "
                "(see `python -m portside edge --help`)"
            )
        edge_args = ("--workers", str(args.workers))
    client = docker.from_env()
    stack.callback(client.close)
    print(f"building {IMAGE} from {UPSTREAM_SOURCE.relative_to(ROOT)} ...", flush=True)
    build_upstream_image(client)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-dataplane-"))
    stack.callback(shutil.rmtree, tmp, True)
    upstream = stack.enter_context(upstream_container(client))
    wait_for_hello(upstream, {}, timeout_s=10)

    nginx = Nginx(tmp / "nginx", upstream)
    if {"nginx", "nginx-tls"} & set(only):
        stack.callback(nginx.stop)
        nginx.start()

    relays = Relays(upstream)
    if "relay" in only:
        stack.callback(relays.stop)
        relays.start()

    clusters: dict[str, BenchCluster] = {}
    for secure in (False, True):
        suffix = "-tls" if secure else ""
        if not {f"portside{suffix}", f"ws-portside{suffix}"} & set(only):
            continue
        kind = "tls" if secure else "plain"
        cluster = BenchCluster(
            tmp / f"portside-{kind}",
            secure=secure,
            node_id=f"dataplane-{os.getpid()}-{kind}",
            edge_args=edge_args,
        )
        stack.callback(cluster.stop, client)
        print(f"starting a Portside cluster ({'mutual TLS' if secure else '--insecure'}) ...")
        cluster.start()
        boot = cluster.deploy_and_warm()
        print(f"  edge {cluster.edge}: the first request answered after {boot:.2f} s (boot)")
        clusters[f"portside{suffix}"] = cluster

    workers = f", edge --workers {args.workers}" if args.workers else ""
    rows = [
        Row("straight", "straight to the container", f"http://{upstream}/", {}),
        Row(
            "nginx",
            "nginx, two hops",
            f"http://127.0.0.1:{nginx.plain_port}/",
            {},
            "nginx",
            nginx.hops(),
        ),
        Row(
            "relay",
            "Python relay, two hops, no features (the floor)",
            f"http://127.0.0.1:{relays.port}/",
            {},
            "nginx",
            tuple(p.pid for p in relays.procs),
        ),
        Row(
            "portside",
            f"Portside, edge → agent (plaintext{workers})",
            f"http://{clusters['portside'].edge}/" if "portside" in clusters else "",
            HEADERS,
            "nginx",
            clusters["portside"].hops() if "portside" in clusters else (),
        ),
        Row(
            "nginx-tls",
            "nginx, two hops, mutual TLS between",
            f"http://127.0.0.1:{nginx.tls_port}/",
            {},
            "nginx-tls",
            nginx.hops(),
        ),
        Row(
            "portside-tls",
            f"Portside, edge → agent (mutual TLS{workers})",
            f"http://{clusters['portside-tls'].edge}/" if "portside-tls" in clusters else "",
            HEADERS,
            "nginx-tls",
            clusters["portside-tls"].hops() if "portside-tls" in clusters else (),
        ),
    ]
    script = tmp / "report.lua"
    script.write_text(WRK_REPORT)
    load_before = os.getloadavg()
    rounds: dict[str, list[Measured]] = {row.name: [] for row in rows if row.name in only}
    for i in range(args.rounds):
        for row in rows:
            if row.name in rounds:
                print(f"measuring {row.label} (round {i + 1}/{args.rounds}) ...", flush=True)
                rounds[row.name].append(measure(row, args.connections, args.duration, script))
    results = {
        name: Measured(
            got[0].row,
            median_load([m.one for m in got]),
            median_load([m.many for m in got]),
            median_cpu(got),
        )
        for name, got in rounds.items()
    }

    echoes: dict[str, tuple[str, Echoes]] = {}
    ws_targets: list[tuple[str, str, str, dict[str, str]]] = [
        ("ws-straight", "straight to the container", f"ws://{upstream}/ws", {})
    ]
    for name, cluster in clusters.items():
        kind = "mutual TLS" if name.endswith("tls") else "plaintext"
        label = f"Portside, edge → agent ({kind}{workers})"
        ws_targets.append((f"ws-{name}", label, f"ws://{cluster.edge}/ws", HEADERS))
    for name, label, url, headers in ws_targets:
        if name in only:
            print(f"WebSocket echo, {label} ...", flush=True)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                got = runner.run(ws_echoes(url, headers, args.ws_clients, args.duration))
            echoes[name] = (label, got)

    print()
    medians = f"the median of {args.rounds} interleaved rounds" if args.rounds > 1 else "1 round"
    print(
        f"one wrk thread, {args.duration:g} s per measurement, {medians}; {os.cpu_count()} cores; "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    if results:
        print_table(results, args.connections)
    if echoes:
        print()
        print_ws(echoes, args.ws_clients)
    if args.keep:
        keep_running(upstream, nginx, clusters, client)


def keep_running(
    upstream: str, nginx: Nginx, clusters: dict[str, BenchCluster], client: docker.DockerClient
) -> None:
    print("\nkept running until Ctrl-C (or SIGTERM):")
    print(f"  upstream container {upstream}")
    if nginx.procs:
        pids = ", ".join(str(p.pid) for p in nginx.procs)
        print(
            f"  nginx plain 127.0.0.1:{nginx.plain_port}, mutual TLS 127.0.0.1:{nginx.tls_port} "
            f"(masters B, A: {pids}; config in {nginx.tmp})"
        )
    for name, cluster in clusters.items():
        daemons = ", ".join(
            f"{next(a for a in p.args if a in ('controlplane', 'agent', 'edge'))} {p.pid}"
            for p in cluster.procs
            if isinstance(p.args, list)
        )
        ip = container_ip(client, cluster.node_id, INSTANCE)
        print(
            f"  {name}: edge {cluster.edge} (header X-Session-Id: {INSTANCE}), "
            f"control plane {cluster.controlplane}, container {ip}:8080; pids {daemons}"
            + (" (the edge's pid is its workers' parent)" if cluster.edge_args else "")
        )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main() -> None:
    args = parse_args()
    # The daemons run `python -m portside`: from this checkout, like the code imported here.
    os.chdir(ROOT)
    run_cleaning_up(lambda stack: run(args, stack))


T = TypeVar("T")


def run_cleaning_up(body: Callable[[contextlib.ExitStack], T]) -> T:
    """`body(stack)`, then close `stack` (what the benchmark started) whatever happens:
    on return, on Ctrl-C (exit 130) and on SIGTERM, which cleans up like Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stack = contextlib.ExitStack()
    try:
        return body(stack)
    except KeyboardInterrupt:
        print("interrupted: stopping everything the benchmark started", file=sys.stderr)
        sys.exit(130)
    finally:
        # A second Ctrl-C must not cut the cleanup short (every step of it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()


if __name__ == "__main__":
    main()
