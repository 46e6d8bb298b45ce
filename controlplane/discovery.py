"""Prometheus HTTP service discovery: every live agent, edge and control-plane replica as a
scrape target (`GET /prometheus/targets`), and the registration that makes a replica one.

One `http_sd_configs` entry pointed at any replica's metrics port finds the whole cluster."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from controlplane import records
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import net
from portside.errors import InvalidArgument, StoreError

log = logging.getLogger(__name__)

TARGETS_PATH = "/prometheus/targets"
_UNSPECIFIED = {"", "0.0.0.0", "::", "[::]"}


def reachable_address(address: str, fallback_host: str) -> str:
    """`address` with an unspecified host (0.0.0.0, ::) replaced by `fallback_host`: a daemon
    that listens everywhere is scraped where it was seen from. "" if `address` is unusable."""
    try:
        host, port = net.split_hostport(address)
    except InvalidArgument:
        return ""
    if host in _UNSPECIFIED:
        if not fallback_host or fallback_host in _UNSPECIFIED:
            return ""
        host = fallback_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_host(peer: str) -> str:
    """The IP of a gRPC peer string: "ipv4:10.0.0.2:5000" -> "10.0.0.2",
    "ipv6:[::1]:5000" -> "::1"; "" for anything else (unix sockets)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = rest.rpartition(":")[0]
    return host.strip("[]")


def targets(view: ClusterView) -> list[dict[str, Any]]:
    """The http_sd document: one target group per daemon, labelled with its role, region and
    node (agents: node id; edges: edge id; control planes: replica id). Sorted, so that
    Prometheus sees the same document while nothing changes."""
    groups: list[tuple[str, str, str, str]] = []  # role, id, region, address
    for replica_id, replica in view.replicas.items():
        groups.append(("controlplane", replica_id, replica.region, replica.metrics_address))
    for node in view.nodes.values():
        # An agent's /metrics is on its own plain-HTTP port; its data port admits only the
        # cluster's parts. An agent older than that sends none: nothing to scrape there.
        groups.append(("agent", node.id, node.region, node.metrics_address))
    for edge_id, demand in view.demand.items():
        groups.append(("edge", edge_id, demand.region, demand.metrics_address))
    return [
        {
            "targets": [address],
            "labels": {"portside_role": role, "portside_region": region, "portside_node": ident},
        }
        for role, ident, region, address in sorted(groups)
        if address
    ]


def targets_route(view: ClusterView) -> web.RouteDef:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(targets(view))

    return web.get(TARGETS_PATH, handle)


class ReplicaRegistration:
    """Keeps `replicas/<id>` in the store under a lease this replica refreshes every third of
    its TTL; when a refresh fails (the lease expired, the store was away) it registers anew."""

    def __init__(
        self, store: Store, replica_id: str, record: records.Replica, ttl_s: int = 10
    ) -> None:
        self.store = store
        self.replica_id = replica_id
        self.record = record
        self.ttl_s = ttl_s
        self.lease = 0

    async def run(self) -> None:
        while True:
            try:
                if not self.lease or not await self.store.refresh_lease(self.lease):
                    lease = await self.store.grant_lease(self.ttl_s)
                    await self.store.put(
                        records.replica_key(self.replica_id), self.record.encode(), lease
                    )
                    self.lease = lease
            except StoreError as exc:
                log.warning("could not register replica %s: %s", self.replica_id, exc)
                self.lease = 0
            await asyncio.sleep(self.ttl_s / 3)

    async def deregister(self) -> None:
        if self.lease:
            try:
                await self.store.revoke_lease(self.lease)
            except StoreError as exc:
                log.warning("could not deregister replica %s: %s", self.replica_id, exc)
            self.lease = 0
