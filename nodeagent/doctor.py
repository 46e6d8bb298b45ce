"""`portside doctor`: whether this host is ready to be a Portside node — Docker engine and its
version, cgroup limits, iptables, Portside's networks and their host isolation rules, the agent's
ports, the clock against the control plane's — as one check each, with what to do."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import docker

from nodeagent.firewall import CHAIN, IPV4, HostFirewall
from nodeagent.runtime.docker_engine import NETWORK_EGRESS, NETWORK_INTERNAL, network_bridge
from portside import net
from portside.errors import FailedPrecondition

_AS_ROOT = "run portside doctor as root, with iptables installed (apt-get install iptables)"

# The oldest engine the agent is tested with (Debian 12's docker.io): the Docker SDK's calls
# the runtime makes (networks' options, nano_cpus, pids limits, init) need API 1.41.
MIN_ENGINE = (20, 10)
MIN_API = (1, 41)
# Leases (10 s), the agent's fence window and certificates' validity are all judged by clocks:
# a second is noticeable, five seconds breaks fencing and fresh certificates.
SKEW_WARN_S = 1.0
SKEW_FAIL_S = 5.0
CLOCK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when it failed, or what a warning suggests
    warning: bool = False  # passed, with something worth fixing (printed `warn`)


@dataclass(frozen=True)
class AgentPort:
    """A port the agent will bind: its role (data, API, metrics) and HOST:PORT."""

    role: str
    address: str


async def check_host(
    networks: Sequence[tuple[str, bool]] = ((NETWORK_INTERNAL, True), (NETWORK_EGRESS, False)),
    firewall: HostFirewall | None = None,
    *,
    ports: Sequence[AgentPort] = (),
    controlplane_clock: str = "",
) -> list[Check]:
    """One Check per line of `portside doctor`. `networks`: (name, internal) of each network;
    `ports`: the agent's listeners to find free; `controlplane_clock`: HOST:PORT of a control
    plane's plain-HTTP metrics port, whose Date header the local clock is compared with."""
    firewall = firewall or HostFirewall()
    checks = [await _iptables(firewall)]
    engine = await asyncio.to_thread(_engine)
    checks += engine
    if engine[0].ok:  # nothing more about networks can be known without the engine
        for name, internal in networks:
            network = await asyncio.to_thread(_network, name)
            checks.append(_network_check(name, internal, network))
            if network is not None:
                checks.append(await _rules(firewall, network))
    checks += [port_check(p) for p in ports]
    if controlplane_clock:
        checks.append(await clock_check(controlplane_clock))
    return checks


async def _iptables(firewall: HostFirewall) -> Check:
    try:
        version = await firewall.version()
        await firewall.listing(IPV4)
    except FailedPrecondition as exc:
        return Check("iptables", False, str(exc), _AS_ROOT)
    return Check("iptables", True, f"{version}, rules readable")


def _engine() -> list[Check]:
    """The engine's check (reachable, recent enough), then its cgroup limits' when it answered."""
    try:
        client = docker.from_env(timeout=5)
        try:
            version = client.version()
            info = client.info()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable engine
        return [Check("docker engine", False, str(exc), "start dockerd, or set DOCKER_HOST")]
    return [engine_check(version), cgroup_check(info)]


# --- versions ---------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...] | None:
    """(20, 10, 24) from "20.10.24+dfsg1", (1, 41) from "1.41"; None when it starts with no
    number. Each dot-separated part counts up to its first non-digit."""
    parts: list[int] = []
    for piece in text.strip().lstrip("v").split("."):
        digits = ""
        for c in piece:
            if not c.isdigit():
                break
            digits += c
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break  # "24+dfsg1", "0-ce": what follows is not a version part
    return tuple(parts) or None


def engine_check(version: Mapping[str, Any]) -> Check:
    """From `docker version`'s server part: Version and ApiVersion against the minimums."""
    engine, api = str(version.get("Version", "")), str(version.get("ApiVersion", ""))
    found = f"Docker {engine or '?'} (API {api or '?'})"
    too_old = []
    parsed = parse_version(engine)
    if parsed is None or parsed < MIN_ENGINE:
        too_old.append(f"engine older than {'.'.join(map(str, MIN_ENGINE))}")
    parsed_api = parse_version(api)
    if parsed_api is None or parsed_api < MIN_API:
        too_old.append(f"API older than {'.'.join(map(str, MIN_API))}")
    if too_old:
        return Check(
            "docker engine",
            False,
            f"{found}: {', '.join(too_old)}",
            "upgrade Docker to 20.10 or later (Debian 12's docker.io, or docker-ce from Docker's "
            "repository), then restart dockerd",
        )
    return Check("docker engine", True, found)


# --- cgroups ------------------------------------------------------------------------------------

# `docker info` field → what Portside sets through it, and what is lost without it.
_LIMITS = (
    ("MemoryLimit", "memory limits (instance types' memory)"),
    ("CpuCfsQuota", "CPU quotas (instance types' vCPU, as nano_cpus)"),
    ("PidsLimit", "pids limits (every container)"),
)


def cgroup_check(info: Mapping[str, Any]) -> Check:
    """Whether Docker can enforce the limits Portside gives every container, from `docker info`:
    cgroup version and driver, the support flags, and the warnings Docker itself reports."""
    version = str(info.get("CgroupVersion") or "1")  # absent before API 1.40: always v1
    driver = str(info.get("CgroupDriver") or "?")
    found = f"cgroup v{version}, driver {driver}"
    missing = [what for key, what in _LIMITS if info.get(key) is False]
    warnings = [str(w).removeprefix("WARNING: ") for w in info.get("Warnings") or ()]
    about_limits = [w for w in warnings if "limit" in w.lower() or "cgroup" in w.lower()]
    if missing:
        if version == "2":
            fix = (
                "enable the cpu, memory and pids controllers for Docker (cgroup v2: boot with "
                "systemd.unified_cgroup_hierarchy=1 and a kernel built with them; check "
                "/sys/fs/cgroup/cgroup.controllers), then restart dockerd"
            )
        else:
            fix = (
                "enable the memory, cpu and pids cgroup controllers (cgroup v1: add "
                "cgroup_enable=memory to GRUB_CMDLINE_LINUX, update-grub, reboot), then "
                "restart dockerd"
            )
        said = f"; Docker says: {'; '.join(about_limits)}" if about_limits else ""
        return Check("cgroup limits", False, f"{found}: no {', no '.join(missing)}{said}", fix)
    detail = f"{found}: memory, CPU quota and pids limits enforceable"
    if info.get("SwapLimit") is False or about_limits:
        said = "; ".join(about_limits) or "no swap limit support"
        return Check(
            "cgroup limits",
            True,
            f"{detail}; but {said}: a container may use swap beyond its memory",
            "boot with swapaccount=1 (cgroup v1) or a kernel with swap accounting, or run the "
            "host without swap",
            warning=True,
        )
    return Check("cgroup limits", True, detail)


# --- ports ------------------------------------------------------------------------------------


def port_check(port: AgentPort) -> Check:
    """Whether the agent could bind `port` now (with SO_REUSEADDR, as it does: a port left in
    TIME_WAIT is free), and when not, who holds it."""
    name = f"{port.role} port {port.address}"
    host, number = net.split_hostport(port.address, f"the agent's {port.role} address")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, number))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            owner = port_owner(number)
            return Check(
                name,
                False,
                f"in use by {owner}",
                f"stop {owner.split(' (')[0]}, or give the agent another port ({_FLAG[port.role]})",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return Check(
                name,
                False,
                f"{host} is not an address of this host",
                f"give {_FLAG[port.role]} an address of this host (or 0.0.0.0)",
            )
        return Check(
            name, False, f"cannot bind: {exc.strerror}", f"run as root, or {_FLAG[port.role]}"
        )
    return Check(name, True, "free")


_FLAG = {"data": "--listen", "API": "--api-listen", "metrics": "--metrics-listen"}


def agent_ports(listen: str, api_listen: str = "", metrics_listen: str = "") -> list[AgentPort]:
    """The agent's three listeners from its own flags and defaults (API: --listen port + 1,
    metrics: --listen port + 2)."""
    return [
        AgentPort("data", listen),
        AgentPort("API", api_listen or net.with_port_offset(listen, 1)),
        AgentPort("metrics", metrics_listen or net.with_port_offset(listen, 2)),
    ]


def listening_inodes(proc_net_tcp: str, port: int) -> set[int]:
    """The socket inodes listening on `port` (any address) in a /proc/net/tcp or tcp6 text."""
    found = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
            continue
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.add(int(fields[9]))
    return found


def port_owner(port: int) -> str:
    """ "pid 1234 (nginx -g ...)" of the process listening on `port`, as far as this user can
    see (root sees every process; others only their own)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                inodes |= listening_inodes(f.read(), port)
        except OSError:
            continue
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if wanted else ():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} ({argv[:80]})"
        except OSError:
            continue  # gone, or not ours to read
    return "a process this user cannot see (run as root to name it)"


# --- clock ------------------------------------------------------------------------------------


def skew_bounds(sent_at: float, received_at: float, server_date: float) -> tuple[float, float]:
    """The server's clock minus ours, as an interval. An HTTP Date header counts whole seconds
    (truncated) and was written between our send and our receipt, so the server's time then was
    in [date, date + 1) while ours was in [sent_at, received_at]."""
    return server_date - received_at, server_date + 1.0 - sent_at


def skew_check(address: str, low: float, high: float) -> Check:
    """The verdict on a skew interval: its smallest possible size against the thresholds."""
    least = 0.0 if low <= 0.0 <= high else min(abs(low), abs(high))
    side = "ahead of" if low > 0 else "behind"
    name = f"clock against {address}"
    detail = f"control plane's clock minus this host's: {low:+.1f} s to {high:+.1f} s"
    detail += " (resolution 1 s: the HTTP Date header counts whole seconds)"
    fix = (
        f"the control plane's clock is at least {least:.1f} s {side} this host's: run NTP on "
        "both (systemd-timesyncd or chrony) and check `timedatectl`"
    )
    if least > SKEW_FAIL_S:
        return Check(
            name, False, detail, fix + f" (leases and certificates need < {SKEW_FAIL_S:g} s)"
        )
    if least > SKEW_WARN_S:
        return Check(name, True, detail, fix, warning=True)
    return Check(name, True, detail)


async def clock_check(address: str) -> Check:
    """The Date header of GET /healthz on a control plane's metrics port (plain HTTP; any status
    carries a Date, so no metrics token is needed), against this host's clock."""
    deadlines = net.Deadlines(connect=CLOCK_TIMEOUT_S, upstream_read=CLOCK_TIMEOUT_S)
    try:
        async with net.http_client_session(deadlines, limit=1) as session:
            sent_at = time.time()
            async with session.get(f"http://{address}/healthz") as resp:
                received_at = time.time()
                date = resp.headers.get("Date", "")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Check(
            f"clock against {address}",
            False,
            f"cannot reach the control plane's metrics port: {exc or type(exc).__name__}",
            "give --controlplane (or --controlplane-metrics when its --metrics-listen is not its "
            "port + 1), and open that port from this host",
        )
    try:
        server_date = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return Check(
            f"clock against {address}",
            False,
            f"its answer carries no usable Date header ({date!r})",
            "point --controlplane-metrics at a Portside control plane's metrics port",
        )
    return skew_check(address, *skew_bounds(sent_at, received_at, server_date))


# --- networks and host isolation --------------------------------------------------------------


def _network(name: str) -> dict[str, Any] | None:
    """The network the agent would use (the oldest of that exact name), None if there is none."""
    client = docker.from_env(timeout=5)
    try:
        found = [n for n in client.api.networks(names=[name]) if n.get("Name") == name]
    finally:
        client.close()
    return min(found, key=lambda n: (n.get("Created", ""), n["Id"])) if found else None


def _network_check(name: str, internal: bool, network: dict[str, Any] | None) -> Check:
    what = f"network {name}"
    if network is None:
        return Check(what, True, "not created yet: the agent creates it, and its rules, at start")
    bridge = network_bridge(network)
    if bool(network.get("Internal")) != internal:
        return Check(
            what,
            False,
            f"exists with internal={network.get('Internal')}, Portside needs {internal}",
            f"docker network rm {name} (the agent creates it again)",
        )
    kind = "internal (no way out)" if internal else "with a way out"
    gateways = ", ".join(bridge.gateways) or "none"
    return Check(what, True, f"bridge {bridge.interface}, {kind}, gateway {gateways}")


async def _rules(firewall: HostFirewall, network: dict[str, Any]) -> Check:
    bridge = network_bridge(network)
    what = f"host isolation {bridge.network}"
    try:
        missing = await firewall.check([bridge])
    except FailedPrecondition as exc:
        return Check(what, False, f"cannot read the rules: {exc}", _AS_ROOT)
    if missing:
        return Check(
            what,
            False,
            "; ".join(missing),
            "start the agent as root (it installs the rules at start); restart it if something "
            "removed them (a firewall reload)",
        )
    return Check(
        what,
        True,
        f"INPUT sends {bridge.interface} to {CHAIN}: containers reach nothing on this host",
    )


__all__ = [
    "AgentPort",
    "Check",
    "agent_ports",
    "cgroup_check",
    "check_host",
    "clock_check",
    "engine_check",
    "parse_version",
    "port_check",
    "skew_bounds",
    "skew_check",
]
