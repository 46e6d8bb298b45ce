"""Backpressure on the data plane (issue 11): while a slow client downloads a large body through
edge → agent → container, neither proxy may buffer it — their memory stays flat.

Starts a Portside cluster of real separate processes (bench/dataplane.py's BenchCluster: control
plane on an embedded store, agent, edge; plaintext, or with --secure mutual TLS edge → agent as
`portside up`), deploys the test image portside-test/echo (its `/bytes?N` answers N zero bytes
with a Content-Length) under the route /download, boots the instance, then downloads --size bytes
through the edge twice, with a raw asyncio client:
  slow        reading at --rate MiB/s: 64 KiB reads paced by sleeping, the socket's receive buffer
              held small (SO_RCVBUF 256 KiB) so that the slowness reaches the proxies
  full speed  the same client without pacing: the baseline
sampling every 0.5 s the RSS (VmRSS) of the edge and agent processes and the bytes received.
Everything it starts it stops on exit, Ctrl-C included; traffic goes only to 127.0.0.1.
Usage: python bench/slow_download.py [--size BYTES] [--rate MIB_PER_S] [--secure]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dataplane import BenchCluster, get, run_cleaning_up  # noqa: E402
from bench.named_instances import IMAGE  # noqa: E402
from tests.images.build import build_image  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
ROUTE = "/download"
INSTANCE = f"slow-download-{os.getpid()}"
HEADERS = {"X-Session-Id": INSTANCE}
READ_SIZE = 64 * 1024
RCVBUF = 256 * 1024  # asked for; Linux doubles it for its bookkeeping, and autotuning stops
SAMPLE_EVERY_S = 0.5
SERIES_EVERY = 4  # samples: one line of the printed series every 2 s
MAX_HEAD = 64 * 1024

CONFIG = f"""
[[containers]]
class_name = "Download"
image = "{IMAGE}"
instance_type = "standard-1"
[[routes]]
path = "{ROUTE}"
class_name = "Download"
instance = "header:X-Session-Id"
"""


# -- the cluster ------------------------------------------------------------------------------


def boot(edge: str, timeout_s: float = 60.0) -> float:
    """GET /download/whoami until the instance answers (the first request boots it; before the
    edge has the deployed routes it may answer otherwise); its seconds."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            status, body = get(edge, f"{ROUTE}/whoami", HEADERS)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200 and INSTANCE.encode() in body:
                return time.monotonic() - start
            last = f"{status} {body[:200]!r}"
        time.sleep(0.2)
    raise RuntimeError(f"{edge}{ROUTE}/whoami did not answer from the instance: {last}")


def daemon_pid(cluster: BenchCluster, daemon: str) -> int:
    for p in cluster.procs:
        if isinstance(p.args, list) and daemon in p.args:
            return p.pid
    raise RuntimeError(f"no {daemon} process in the cluster")


def rss_bytes(pid: int) -> int | None:
    """VmRSS of `pid`, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the sampling began (just before the request)
    received: int  # body bytes so far
    rss: dict[str, int | None]  # by daemon name


@dataclass
class Download:
    """One download through the edge, with the samples taken while it ran."""

    rate: float | None  # bytes a second the client reads at; None: as fast as it can
    content_length: int = -1
    received: int = 0
    seconds: float = 0.0
    status: str = ""
    failure: str = ""  # why it ended before the body did, if it did
    samples: list[Sample] = field(default_factory=list)

    def start_rss(self, daemon: str) -> int | None:
        return self.samples[0].rss[daemon] if self.samples else None

    def max_rss(self, daemon: str) -> int | None:
        seen = [r for s in self.samples if (r := s.rss[daemon]) is not None]
        return max(seen) if seen else None


def content_length(head: bytes) -> tuple[str, int]:
    """The status line and Content-Length of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise RuntimeError(f"expected a Content-Length body, got {line!r}")
    if length < 0:
        raise RuntimeError(f"no Content-Length in the response: {lines[0]!r}")
    return lines[0], length


async def fetch(edge: str, size: int, download: Download) -> None:
    """GET /download/bytes?size through the edge on a socket of its own, reading at
    download.rate (never ahead of it: before each read, sleep until the bytes so far are due)."""
    loop = asyncio.get_running_loop()
    host, port = edge.rsplit(":", 1)
    request = (
        f"GET {ROUTE}/bytes?{size} HTTP/1.1\r\nHost: {edge}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in HEADERS.items())
        + "Connection: close\r\n\r\n"
    ).encode()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Before connect: the window offered in the handshake is sized from it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setblocking(False)
        start = loop.time()
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, request)
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            n = await loop.sock_recv_into(sock, view)
            if n == 0:
                raise RuntimeError(f"closed before the response head ended: {bytes(head)!r}")
            head += view[:n]
            if len(head) > MAX_HEAD:
                raise RuntimeError("a response head over 64 KiB")
        download.status, download.content_length = content_length(bytes(head[:end]))
        if not download.status.split(" ")[1:2] == ["200"]:
            raise RuntimeError(f"expected 200, got {download.status!r}")
        download.received = len(head) - end - 4
        body_start = loop.time()
        while download.received < download.content_length:
            if download.rate is not None:
                delay = body_start + download.received / download.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            want = min(READ_SIZE, download.content_length - download.received)
            n = await loop.sock_recv_into(sock, view[:want])
            if n == 0:
                download.failure = "the edge closed the connection before the body's end"
                break
            download.received += n
        download.seconds = loop.time() - start


def take_sample(download: Download, pids: dict[str, int], start: float) -> None:
    download.samples.append(
        Sample(
            asyncio.get_running_loop().time() - start,
            download.received,
            {name: rss_bytes(pid) for name, pid in pids.items()},
        )
    )


async def sample(download: Download, pids: dict[str, int], start: float) -> None:
    """Every SAMPLE_EVERY_S after `start` (on a fixed schedule, not drifting), until cancelled."""
    loop = asyncio.get_running_loop()
    tick = 0
    while True:
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * SAMPLE_EVERY_S - loop.time()))
        take_sample(download, pids, start)


async def measure(
    edge: str, size: int, rate: float | None, pids: dict[str, int], timeout_s: float
) -> Download:
    download = Download(rate)
    start = asyncio.get_running_loop().time()
    take_sample(download, pids, start)  # the start: before the request is sent
    sampler = asyncio.create_task(sample(download, pids, start))
    try:
        async with asyncio.timeout(timeout_s):
            await fetch(edge, size, download)
    except TimeoutError:
        download.failure = f"not done within the bound of {timeout_s:.0f} s"
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    take_sample(download, pids, start)  # the end: after the last byte
    return download


# -- the report -------------------------------------------------------------------------------


def mib(n: int | None) -> str:
    return "gone" if n is None else f"{n / MIB:.1f} MiB"


def growth(download: Download, daemon: str) -> str:
    start, peak = download.start_rss(daemon), download.max_rss(daemon)
    if start is None or peak is None:
        return "—"
    share = (peak - start) / max(1, download.content_length)
    return f"{(peak - start) / MIB:+.1f} MiB ({share:.2%} of the body)"


def outcome(download: Download, size: int) -> str:
    ok = download.received == size == download.content_length and not download.failure
    verdict = "OK" if ok else f"NOT the whole body: {download.failure or 'size mismatch'}"
    rate = download.received / download.seconds / MIB if download.seconds else 0.0
    return (
        f"received {download.received:,} of {size:,} bytes ({verdict}), "
        f"{download.seconds:.2f} s, {rate:.1f} MiB/s"
    )


def print_slow(download: Download, size: int, pids: dict[str, int]) -> None:
    assert download.rate is not None
    print(f"slow client, paced at {download.rate / MIB:g} MiB/s:")
    print(f"  {outcome(download, size)}")
    print("  | process | RSS at start | max RSS | max growth over start |")
    print("  |---|---|---|---|")
    for daemon in pids:
        print(
            f"  | {daemon} (pid {pids[daemon]}) | {mib(download.start_rss(daemon))} "
            f"| {mib(download.max_rss(daemon))} | {growth(download, daemon)} |"
        )
    print(f"  series, every {SAMPLE_EVERY_S * SERIES_EVERY:g} s:")
    print("    t s     received MiB  " + "  ".join(f"{d + ' RSS MiB':>14}" for d in pids))
    *during, end = download.samples
    for s, when in [(s, f"{s.t:5.1f}") for s in during[::SERIES_EVERY]] + [(end, "  end")]:
        rss = "  ".join(
            f"{'gone' if (r := s.rss[d]) is None else f'{r / MIB:.1f}':>14}" for d in pids
        )
        print(f"    {when}   {s.received / MIB:12.1f}  {rss}")


def print_baseline(download: Download, size: int, pids: dict[str, int]) -> None:
    growths = ", ".join(f"{d} {growth(download, d)}" for d in pids)
    print(f"full speed (baseline, no pacing): {outcome(download, size)}; max RSS growth: {growths}")


def print_headroom(slow: Download, fast: Download) -> None:
    """How much faster than the slow client the path can deliver: the more, the more a proxy
    without backpressure would have piled up."""
    if not (slow.seconds and fast.seconds and slow.received and fast.received):
        return
    ratio = (slow.received / slow.seconds) / (fast.received / fast.seconds)
    print(f"the slow client read at {ratio:.0%} of the path's full speed")
    if ratio > 0.5:
        print(
            "  ! the path's full speed is less than twice --rate: a proxy without backpressure "
            "could have piled up only the difference; a lower --rate tests it harder"
        )


# -- the run ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=GIB, help="bytes to download (default 1 GiB)")
    parser.add_argument(
        "--rate", type=float, default=16.0, help="the slow client's MiB/s (default 16)"
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="mutual TLS edge → agent, bootstrapped like `portside up` (default: --insecure)",
    )
    args = parser.parse_args()
    if not 1 <= args.size <= 64 * GIB:
        parser.error("--size: from 1 byte to 64 GiB")
    if not 0.1 <= args.rate <= 10_000:
        parser.error("--rate: from 0.1 to 10000 MiB/s")
    return args


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> bool:
    """True when both downloads got the whole body."""
    client = docker.from_env()
    stack.callback(client.close)
    print(f"building {IMAGE} ...", flush=True)
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-slow-download-"))
    stack.callback(shutil.rmtree, tmp, True)
    cluster = BenchCluster(tmp / "portside", secure=args.secure, node_id=INSTANCE)
    stack.callback(cluster.stop, client)
    hop = "mutual TLS" if args.secure else "plaintext, --insecure"
    print(f"starting a Portside cluster (edge → agent {hop}) ...", flush=True)
    cluster.start()
    cluster.deploy(CONFIG, "slow_download")
    print(f"  edge {cluster.edge}: the first request answered after {boot(cluster.edge):.2f} s")
    pids = {daemon: daemon_pid(cluster, daemon) for daemon in ("edge", "agent")}

    rate = args.rate * MIB
    timeout_s = args.size / rate * 3 + 60
    with asyncio.Runner() as runner:
        # A small download first: the code paths of a streamed body are warm before measuring.
        warm = runner.run(measure(cluster.edge, MIB, None, pids, 60))
        if warm.received != MIB:
            raise RuntimeError(f"the warm-up download failed: {outcome(warm, MIB)}")
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        effective = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        probe.close()
        print(
            f"downloading GET {ROUTE}/bytes?{args.size} through the edge: {READ_SIZE // 1024} KiB "
            f"reads, SO_RCVBUF {RCVBUF // 1024} KiB (the kernel reports {effective // 1024} KiB); "
            f"bound {timeout_s:.0f} s each ...",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        slow = runner.run(measure(cluster.edge, args.size, rate, pids, timeout_s))
        fast = runner.run(measure(cluster.edge, args.size, None, pids, timeout_s))
    print()
    print(
        f"{os.cpu_count()} cores; load average before {load_before:.2f}, "
        f"after {os.getloadavg()[0]:.2f}; edge → agent {hop}"
    )
    print_slow(slow, args.size, pids)
    print_baseline(fast, args.size, pids)
    print_headroom(slow, fast)
    return all(d.received == args.size and not d.failure for d in (slow, fast))


def main() -> None:
    args = parse_args()
    # The daemons run `python -m portside`: from this checkout, like the code imported here.
    os.chdir(ROOT)
    ok = run_cleaning_up(lambda stack: run(args, stack))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
