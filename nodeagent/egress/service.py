"""The node's outbound control as the agent runs it: the proxy and the DNS responder on the egress
bridge's gateway address, the rules that send this agent's containers to them, and the table
of which container is which instance, kept as containers start and stop.

    egress = Egress(node.id, catalog.get, deadlines, network=runtime.egress_network)
    await isolate_host(runtime, allow_host_access=..., egress=egress.guard)
    manager's on_change -> egress.containers_changed(manager.snapshot())
    egress.set_policy(class_name, name, policy)        # SetOutbound
    egress.proxy.handlers = gateway_runtime            # outbound handlers (OutboundHandlers)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence

from nodeagent.egress.dns import DnsResponder, host_resolvers
from nodeagent.egress.policies import OutboundPolicies, egress_occupants
from nodeagent.egress.proxy import EgressProxy, OutboundHandlers
from nodeagent.egress.rules import EgressFirewall, EgressPorts, chain_for
from nodeagent.instances import InstanceSnapshot
from nodeagent.runtime.docker_engine import NetworkBridge
from portside.errors import FailedPrecondition
from portside.net import Deadlines
from portside.spec import ContainerClass, OutboundPolicy

log = logging.getLogger(__name__)


class Egress:
    """One agent's outbound control for the egress network `network`."""

    def __init__(
        self,
        node_id: str,
        class_named: Callable[[str], ContainerClass | None],
        deadlines: Deadlines,
        *,
        network: str,
        handlers: OutboundHandlers | None = None,
        resolvers: Sequence[str] | None = None,
        firewall: EgressFirewall | None = None,
    ) -> None:
        self.network = network
        self.policies = OutboundPolicies(class_named)
        self.proxy = EgressProxy(self.policies, deadlines, handlers=handlers, node_id=node_id)
        self.firewall = firewall or EgressFirewall(chain_for(node_id))
        self._class_named = class_named
        self._resolvers = list(resolvers) if resolvers is not None else host_resolvers()
        self._dns: DnsResponder | None = None
        self._bridge: NetworkBridge | None = None
        self._ports: EgressPorts | None = None
        self._syncing: asyncio.Task[None] | None = None
        self._dirty = False

    @property
    def bridge(self) -> NetworkBridge | None:
        return self._bridge

    @property
    def ports(self) -> EgressPorts | None:
        return self._ports

    async def guard(self, bridges: list[NetworkBridge]) -> None:
        """The runtime's guard (see isolate_host): on the egress bridge, listen and put the
        rules in place before any container joins it; again when the network was made anew."""
        bridge = next((b for b in bridges if b.network == self.network), None)
        if bridge is None:
            return
        if not bridge.gateways:
            raise FailedPrecondition(f"network {bridge.network} has no gateway address")
        if self._bridge is None or bridge.gateways[0] != self._bridge.gateways[0]:
            await self._listen(bridge)
        self._bridge = bridge
        self.proxy.closed_networks = tuple(
            network
            for b in bridges
            for text in b.subnets
            if isinstance(network := ipaddress.ip_network(text), ipaddress.IPv4Network)
        )
        assert self._ports is not None
        await self.firewall.sync(bridge, self._ports, self.policies.addresses)
        log.info(
            "outbound control: containers on %s (%s) go through %s:%d (DNS on port %d)",
            bridge.network,
            bridge.interface,
            bridge.gateways[0],
            self._ports.proxy,
            self._ports.dns,
        )

    async def _listen(self, bridge: NetworkBridge) -> None:
        await self._close_listeners()
        address = bridge.gateways[0]
        try:
            proxy = await self.proxy.listen(address)
            self._dns = DnsResponder(self.policies, address, self._resolvers)
            dns = await self._dns.listen()
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot listen on {address} for the egress proxy: {exc}"
            ) from exc
        self._ports = EgressPorts(proxy=proxy, dns=dns)

    def containers_changed(self, snapshots: Iterable[InstanceSnapshot]) -> None:
        """This node's containers as they are now: the table follows at once, the rules soon
        (one sync at a time; changes meanwhile go in the next)."""
        before = self.policies.occupants()
        changed = self.policies.replace(egress_occupants(snapshots, self._class_named))
        now = {o.container_id for o in self.policies.occupants().values()}
        self.proxy.forget(o.container_id for o in before.values() if o.container_id not in now)
        if changed:
            self._dirty = True
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        while self._dirty and self._bridge is not None and self._ports is not None:
            self._dirty = False
            try:
                await self.firewall.sync(self._bridge, self._ports, self.policies.addresses)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, never ends the loop
                # Fails closed: a container without its rule has its packets dropped.
                log.error("outbound control: the rules could not be updated: %s", exc)
                self._dirty = True
                await asyncio.sleep(1.0)

    def set_policy(self, class_name: str, name: str, policy: OutboundPolicy | None) -> None:
        """SetOutbound: instance `name` of `class_name` follows `policy` from its next
        connection on (None: its class's again). ValueError for a bad host pattern."""
        self.policies.set_policy(class_name, name, policy)

    async def synced(self) -> None:
        """Wait until the rules match the table (tests, and a caller that must know)."""
        while self._syncing is not None and not self._syncing.done():
            await asyncio.shield(self._syncing)

    async def _close_listeners(self) -> None:
        self.proxy.stop_listening()
        if self._dns is not None:
            await self._dns.close()
            self._dns = None

    async def close(self) -> None:
        """Stop listening and take this agent's redirects away: containers that keep running
        (for the next agent to adopt) have their traffic dropped until it redirects them."""
        if self._syncing is not None:
            self._syncing.cancel()
        await self._close_listeners()
        await self.proxy.close()
        if self._ports is not None:
            try:
                await self.firewall.leave()
            except FailedPrecondition as exc:
                log.warning("outbound control: could not take this agent's rules away: %s", exc)


__all__ = ["Egress"]
