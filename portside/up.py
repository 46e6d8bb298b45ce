"""`portside up`: a whole Portside on one machine — control plane (embedded store and image store
in the data directory), one agent, one edge — as three supervised processes, from
./portside.toml. Ctrl-C stops them all.

It is secured like any cluster: the first `up` bootstraps its store (the cluster CA, an admin and
a join token in the data directory, 0600); the agent and the edge join with the join token, and
the CLI run in the same directory finds the admin token there (./.portside/admin.token)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from portside import config as config_file
from portside.errors import FailedPrecondition, PortsideError, Unavailable
from portside.net import split_hostport, with_port_offset

log = logging.getLogger("portside.up")

PARENT_ENV = "PORTSIDE_UP_PID"


@dataclass(frozen=True)
class UpOptions:
    config: str
    listen: str
    controlplane_listen: str
    agent_listen: str
    region: str
    data_dir: str
    edge_workers: int = 1
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 15.0


def run(opts: UpOptions) -> int:
    config_file.load_config(opts.config)  # a bad config fails here, before anything starts
    data_dir = Path(opts.data_dir).resolve()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store_url = f"sqlite://{data_dir / 'store.db'}"
    try:
        admin_token, join_token, secrets_key = _bootstrap(store_url, data_dir)
    except PortsideError as exc:
        print(f"portside up: {exc}", file=sys.stderr)
        return 1
    portside = [sys.executable, "-m", "portside"]
    stop = StopRequest()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, *args: str) -> None:
        # A new session each: Ctrl-C reaches `up` only, which then stops them in order. And
        # each stops if `up` itself dies (killed, crashed), so none is left behind: the child
        # asks for that itself (a preexec_fn could deadlock: `up` runs gRPC's threads).
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        proc = subprocess.Popen([*portside, *args], start_new_session=True, env=env)
        children.append((name, proc))

    try:
        spawn(
            "control plane",
            "controlplane",
            "--listen",
            opts.controlplane_listen,
            "--store",
            store_url,
            "--region",
            opts.region,
            "--image-dir",
            str(data_dir / "images"),
            "--secrets-key-file",
            str(secrets_key),
        )
        _wait_for_port(opts.controlplane_listen, "control plane", children, opts.start_timeout_s)
        from portside.cli import deploy_config

        # Dockerfile classes are built and pushed to the control plane's image store here; the
        # agent, on the same engine, finds them there already.
        classes, routes = asyncio.run(
            deploy_config(
                opts.config,
                opts.controlplane_listen,
                admin_token.read_text(),
                report=lambda line: print(line, flush=True),
                on_build_failure=lambda lines: print("\n".join(lines), file=sys.stderr),
            )
        )
        # The agent stops its containers when `up` stops (keeping their writable layers); the
        # next `up` adopts them, as `docker compose up` users expect.
        # Closing the host to containers takes root (packet-filter rules). On a developer's own
        # machine without it, `up` still runs, and says at the end what is left open.
        host_access = [] if os.geteuid() == 0 else ["--allow-host-access"]
        spawn(
            "agent",
            "agent",
            "--controlplane",
            opts.controlplane_listen,
            "--listen",
            opts.agent_listen,
            "--region",
            opts.region,
            "--join-token-file",
            str(join_token),
            "--stop-on-exit",
            *host_access,
        )
        _wait_for_port(opts.agent_listen, "agent", children, opts.start_timeout_s)
        asyncio.run(
            _wait_for_node(opts.controlplane_listen, admin_token.read_text(), opts.start_timeout_s)
        )
        # The public port opens last, once a request can be served: a script that waits for the
        # port and then sends a request must not get "no node agent has registered".
        spawn(
            "edge",
            "edge",
            "--controlplane",
            opts.controlplane_listen,
            "--listen",
            opts.listen,
            "--region",
            opts.region,
            "--join-token-file",
            str(join_token),
            "--workers",
            str(opts.edge_workers),
        )
        _wait_for_port(opts.listen, "edge", children, opts.start_timeout_s)
        print(
            f"Portside is up: http://{opts.listen} serves {classes} classes and {routes} routes "
            f"from {opts.config}\n  cluster page "
            f"http://{with_port_offset(opts.controlplane_listen, 1)}/\n"
            f"  control plane {opts.controlplane_listen} "
            f"(metrics {with_port_offset(opts.controlplane_listen, 1)}), agent "
            f"{opts.agent_listen} (metrics {with_port_offset(opts.agent_listen, 2)}), edge "
            f"metrics {_edge_metrics(opts)}\n"
            f"  store {store_url}; tokens in {data_dir} (`portside ps` here uses "
            f"{admin_token.name}); Ctrl-C stops everything"
            + (
                "\n  not root: containers can reach this machine's ports (run as root to close "
                "them, as every cluster node does)"
                if host_access
                else ""
            ),
            flush=True,
        )
        while not stop.requested:
            for name, proc in children:
                if proc.poll() is not None:
                    raise Unavailable(f"the {name} exited with code {proc.returncode}")
            time.sleep(0.2)
        return 0
    except PortsideError as exc:
        print(f"portside up: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_all(children, opts.stop_timeout_s)


def _edge_metrics(opts: UpOptions) -> str:
    first = with_port_offset(opts.listen, 1)
    if opts.edge_workers == 1:
        return first
    last = with_port_offset(opts.listen, opts.edge_workers)
    return f"{first} … {last} ({opts.edge_workers} workers)"


class StopRequest:
    """For a process that supervises others from a plain loop: `requested` turns true at the
    first SIGINT or SIGTERM (the loop then stops its children in order)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._request)
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True


def stop_with_parent() -> None:
    """In a daemon `up` started: get SIGTERM when `up` dies (Linux' PR_SET_PDEATHSIG), and stop
    at once if it died already."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        sys.exit("portside: `portside up` is gone; stopping")


def _wait_for_port(
    address: str, name: str, children: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float
) -> None:
    import socket

    host, port = split_hostport(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child_name, proc in children:
            if proc.poll() is not None:
                raise Unavailable(
                    f"the {child_name} exited with code {proc.returncode} "
                    "during start-up (its log is above)"
                )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"the {name} did not open {address} within {timeout_s:g}s")


def _bootstrap(store_url: str, data_dir: Path) -> tuple[Path, Path, Path]:
    """Bootstrap the embedded store on the first `up` (its tokens and secrets key go next to
    it); later ones find it bootstrapped and its files there. Returns the admin and join token
    files and the secrets key's."""
    from controlplane.identity import bootstrap_url
    from controlplane.secrets import KEY_FILE, write_key_file

    if not (data_dir / "store.db").exists():
        # Tokens without their store are of a cluster that is gone (its store was deleted).
        for name in ("admin.token", "join.token", KEY_FILE):
            (data_dir / name).unlink(missing_ok=True)
    done = bootstrap_url(store_url, data_dir)
    if done.created:
        log.info("bootstrapped %s: CA fingerprint %s", store_url, done.ca_fingerprint)
    for path in (done.admin_token, done.join_token):
        if not path.exists():
            raise FailedPrecondition(
                f"{path} is missing, and without it nothing can join {store_url}: remove "
                f"{data_dir / 'store.db'} to start a new cluster here (its instances are lost)"
            )
    if not done.secrets_key.exists():
        write_key_file(done.secrets_key)  # a data directory from before gateway secrets
    return done.admin_token, done.join_token, done.secrets_key


async def _wait_for_node(controlplane: str, token_text: str, timeout_s: float) -> None:
    """Ready means the agent has registered: before that every resolve would answer 503."""
    from portside import net
    from portside.api.v1 import controlplane_pb2 as cp
    from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
    from portside.rpc import call_unary
    from portside.tokens import parse_token

    token = parse_token(token_text)
    deadline = time.monotonic() + timeout_s
    tls = net.ClientTls(token.ca_pem)
    async with net.grpc_channel(controlplane, tls=tls, bearer=token.bearer) as channel:
        stub = cp_grpc.ControlPlaneStub(channel)
        while time.monotonic() < deadline:
            reply = await call_unary(
                stub.ListNodes(cp.ListNodesRequest(), timeout=net.Deadlines().rpc),
                f"control plane {controlplane}",
            )
            if reply.nodes:
                return
            await asyncio.sleep(0.05)
    raise Unavailable(f"the agent did not register with the control plane within {timeout_s:g}s")


def _stop_all(children: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float) -> None:
    # Stop in reverse order of start: edge, agent, then the control plane they talk to.
    for name, proc in reversed(children):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the %s did not stop within %gs; killing it", name, timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
