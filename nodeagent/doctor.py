"""`portside doctor`: whether this host is ready to be a Portside node — Docker engine, iptables,
Portside's networks and their host isolation rules — as one check each, with what to do."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import docker

from nodeagent.firewall import CHAIN, IPV4, HostFirewall
from nodeagent.runtime.docker_engine import NETWORK_EGRESS, NETWORK_INTERNAL, network_bridge
from portside.errors import FailedPrecondition

_AS_ROOT = "run portside doctor as root, with iptables installed (apt-get install iptables)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when it failed


async def check_host(
    networks: Sequence[tuple[str, bool]] = ((NETWORK_INTERNAL, True), (NETWORK_EGRESS, False)),
    firewall: HostFirewall | None = None,
) -> list[Check]:
    """One Check per line of `portside doctor`. `networks`: (name, internal) of each network."""
    firewall = firewall or HostFirewall()
    checks = [await _iptables(firewall), *await asyncio.to_thread(_engine)]
    if not checks[-1].ok:
        return checks  # nothing more can be known without the engine
    for name, internal in networks:
        network = await asyncio.to_thread(_network, name)
        checks.append(_network_check(name, internal, network))
        if network is not None:
            checks.append(await _rules(firewall, network))
    return checks


async def _iptables(firewall: HostFirewall) -> Check:
    try:
        version = await firewall.version()
        await firewall.listing(IPV4)
    except FailedPrecondition as exc:
        return Check("iptables", False, str(exc), _AS_ROOT)
    return Check("iptables", True, f"{version}, rules readable")


def _engine() -> list[Check]:
    try:
        client = docker.from_env(timeout=5)
        try:
            version = client.version()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable engine
        return [Check("docker engine", False, str(exc), "start dockerd, or set DOCKER_HOST")]
    return [
        Check(
            "docker engine",
            True,
            f"Docker {version.get('Version')} (API {version.get('ApiVersion')})",
        )
    ]


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


__all__ = ["Check", "check_host"]
