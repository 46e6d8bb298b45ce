"""gRPC clients of the node agents, for the lifecycle API: one cached channel per agent address,
closed when its node leaves; agents' failures become Portside errors with the agent's reason."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controlplane.view import ClusterView
from portside import net
from portside.api.v1 import nodeagent_pb2_grpc as na_grpc
from portside.errors import NodeUnreachable, PortsideError, from_rpc
from portside.spec import Node

log = logging.getLogger(__name__)

R = TypeVar("R")


class AgentClients:
    """With `tls` (the cluster CA, server role agent, this replica's identity), every channel is
    mutual TLS and follows the identity's renewals; without, plaintext (--insecure)."""

    def __init__(
        self,
        view: ClusterView,
        deadlines: net.Deadlines | None = None,
        *,
        tls: net.ClientTls | None = None,
    ) -> None:
        self.view = view
        self.deadlines = deadlines or net.Deadlines()
        self.tls = tls
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}

    def stub(self, node: Node) -> Any:
        """The NodeAgent stub of `node` (an untyped generated class, hence Any)."""
        cached = self._channels.get(node.api_address)
        if cached is None:
            channel = net.grpc_channel(node.api_address, tls=self.tls)
            cached = (channel, na_grpc.NodeAgentStub(channel))
            self._channels[node.api_address] = cached
        return cached[1]

    async def call(
        self,
        node: Node,
        what: str,
        rpc: Callable[[Any], Callable[..., Awaitable[R]]],
        request: Any,
        timeout_s: float | None = None,
    ) -> R:
        """`rpc(stub)(request)` with a deadline (Deadlines.rpc unless given); an agent's failure
        is raised as the Portside error of its status code, with the agent's reason."""
        method = rpc(self.stub(node))
        try:
            return await method(request, timeout=timeout_s or self.deadlines.rpc)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, node, what) from exc

    async def follow_nodes(self) -> None:
        """Close the channels of nodes that left; runs until cancelled."""
        seen = -1
        while True:
            async with self.view.pools_changed:
                while self.view.pools_version == seen:
                    await self.view.pools_changed.wait()
                seen = self.view.pools_version
            await self.close_departed()

    async def close_departed(self) -> None:
        alive = {n.api_address for n in self.view.nodes.values()}
        for address in [a for a in self._channels if a not in alive]:
            channel, _ = self._channels.pop(address)
            log.info("closing the channel to agent %s: its node left", address)
            await channel.close()

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


def translate(exc: grpc.aio.AioRpcError, node: Node, what: str) -> PortsideError:
    """The agent's status as a Portside error with the agent's reason; an unreachable agent is
    named, as that is what the user must know to act."""
    return from_rpc(
        exc, f"{what}: the agent of node {node.id} ({node.api_address})", NodeUnreachable
    )
