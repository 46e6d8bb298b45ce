"""`portside up`: a whole Portside on one machine — control plane (embedded store), one agent,
one edge — as three supervised processes, from ./portside.toml. Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from portside import config as config_file
from portside.errors import PortsideError, Unavailable
from portside.net import split_hostport, with_port_offset

log = logging.getLogger("portside.up")


@dataclass(frozen=True)
class UpOptions:
    config: str
    listen: str
    controlplane_listen: str
    agent_listen: str
    region: str
    data_dir: str
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 15.0


def run(opts: UpOptions) -> int:
    config_file.load_config(opts.config)  # a bad config fails here, before anything starts
    data_dir = Path(opts.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    store_url = f"sqlite://{data_dir / 'store.db'}"
    portside = [sys.executable, "-m", "portside"]
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, *args: str) -> None:
        # A new session each: Ctrl-C reaches `up` only, which then stops them in order.
        proc = subprocess.Popen([*portside, *args], start_new_session=True)
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
        )
        _wait_for_port(opts.controlplane_listen, "control plane", children, opts.start_timeout_s)
        from portside.cli import deploy_config

        classes, routes = asyncio.run(deploy_config(opts.config, opts.controlplane_listen))
        # The agent stops its containers when `up` stops (keeping their writable layers); the
        # next `up` adopts them, as `docker compose up` users expect.
        spawn(
            "agent",
            "agent",
            "--controlplane",
            opts.controlplane_listen,
            "--listen",
            opts.agent_listen,
            "--region",
            opts.region,
            "--stop-on-exit",
        )
        _wait_for_port(opts.agent_listen, "agent", children, opts.start_timeout_s)
        asyncio.run(_wait_for_node(opts.controlplane_listen, opts.start_timeout_s))
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
        )
        _wait_for_port(opts.listen, "edge", children, opts.start_timeout_s)
        print(
            f"Portside is up: http://{opts.listen} serves {classes} classes and {routes} routes "
            f"from {opts.config}\n  cluster page "
            f"http://{with_port_offset(opts.controlplane_listen, 1)}/\n"
            f"  control plane {opts.controlplane_listen} "
            f"(metrics {with_port_offset(opts.controlplane_listen, 1)}), agent "
            f"{opts.agent_listen}, edge metrics {with_port_offset(opts.listen, 1)}\n"
            f"  store {store_url}; Ctrl-C stops everything",
            flush=True,
        )
        while not stopping:
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


async def _wait_for_node(controlplane: str, timeout_s: float) -> None:
    """Ready means the agent has registered: before that every resolve would answer 503."""
    from portside import net
    from portside.api.v1 import controlplane_pb2 as cp
    from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
    from portside.rpc import call_unary

    deadline = time.monotonic() + timeout_s
    async with net.grpc_channel(controlplane) as channel:
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
