"""The gateway module on a node (issue 14): the outbound handlers that answer a container's
intercepted requests run here, in a GatewayRuntime whose bindings reach instances through the
control plane and the data planes of their nodes (this one's too).

    runtime = outbound_runtime(channel, controlplane, transport, secrets, deadlines)
    egress.proxy.handlers = runtime             # the egress proxy calls runtime.outbound(...)
    runtime.load(config)                        # on every config the agent's watch delivers

A node has no route watch, so a binding's fetch resolves its instance on every call (the
control plane answers from its view: one round trip) instead of caching where it lives: a
cached node could be one the instance has left, and its agent would boot it a second time.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from nodeagent import metrics
from nodeagent.egress.policies import OutboundPolicies
from portside import headers
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import GatewayError, UpstreamRefused, from_rpc
from portside.events import Event, EventKind
from portside.gateway import relay
from portside.gateway.runtime import ControlPlaneLifecycle, GatewayRuntime
from portside.gateway.types import Request, Response
from portside.net import Deadlines
from portside.proxy import HttpTransport, ProxyCore, may_resend


class NodeRouter:
    """The gateway's Router on a node: Resolve through the control plane (placing the instance
    if it has no node), then the request goes to that node's data plane with the identity
    headers set here, as an edge sends it. A connection refused before anything was sent is
    resolved and tried once more (the instance may have moved with a lost node)."""

    def __init__(
        self, channel: grpc.aio.Channel, controlplane: str, core: ProxyCore, deadlines: Deadlines
    ) -> None:
        self._stub = cp_grpc.ControlPlaneStub(channel)
        self._where = f"control plane {controlplane}"
        self._core = core
        self._deadlines = deadlines

    async def _resolve(self, class_name: str, name: str, hint: str) -> cp.ResolveResponse:
        request = cp.ResolveRequest(class_name=class_name, instance_name=name, location_hint=hint)
        try:
            reply: cp.ResolveResponse = await self._stub.Resolve(
                request, timeout=self._deadlines.resolve
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, self._where) from exc
        return reply

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response:
        for attempt in (1, 2):
            # A pool (name None) has the control plane choose the member, as for an edge.
            target = await self._resolve(class_name, name or "", location_hint)
            forward = relay.forward_of(
                request,
                add={
                    headers.CLASS: class_name,
                    headers.INSTANCE: target.instance_name or name or "",
                },
            )
            try:
                upstream = await self._core.open(target.data_address, forward)
            except UpstreamRefused as exc:
                if attempt == 2 or not may_resend(forward, exc):
                    raise
                continue
            return relay.response_of(upstream)
        raise AssertionError("unreachable")  # the loop returns or raises


class NodeLimiter:
    """Rate limiters count on the edges (SyncRateLimits is theirs); an outbound handler that
    calls one gets a gateway error saying so, rather than a count that means nothing."""

    async def limit(self, binding: str, key: str) -> bool:
        raise GatewayError(
            f"env.{binding}.limit: rate limiters count requests on the edges; outbound "
            "handlers run on nodes and cannot use them"
        )


def outbound_runtime(
    channel: grpc.aio.Channel,
    controlplane: str,
    transport: HttpTransport,
    secrets: dict[str, str],
    deadlines: Deadlines,
) -> GatewayRuntime:
    """The node's gateway runtime over its control-plane channel, reaching data planes through
    `transport` (mutual TLS as an agent; the caller closes it). The caller keeps it current
    with `runtime.load(config)`, and `secrets` with portside.secretwatch.follow_secrets."""
    core = ProxyCore(transport, name="outbound handlers")
    return GatewayRuntime(
        NodeRouter(channel, controlplane, core, deadlines),
        ControlPlaneLifecycle(channel, controlplane),
        NodeLimiter(),
        secrets,
        errors=metrics.OUTBOUND_HANDLER_ERRORS,
    )


def dropping_own_policies(
    policies: OutboundPolicies, on_event: Callable[[Event], None]
) -> Callable[[Event], None]:
    """The instance manager's `on_event`: an instance's own outbound policy goes with it, so
    one removed here (destroyed, or placed elsewhere meanwhile) has it dropped, and if placed
    here again later starts from its class's until the control plane says otherwise."""

    def handle(event: Event) -> None:
        if event.kind is EventKind.REMOVED:
            policies.set_policy(event.class_name, event.name, None)
        on_event(event)

    return handle
