"""The gateway on an edge: gateway routes answered by the deployed module's `fetch`, whose
bindings reach instances through the edge's own proxy (resolve, route cache, resends), as a
static route's requests do.

    router = EdgeRouter(proxy)
    runtime = GatewayRuntime(router, ControlPlaneLifecycle(channel), limits, secrets)
    proxy.gateway = GatewayIngress(proxy, runtime).serve
"""

from __future__ import annotations

import logging
import time

from edge import metrics, routing
from edge.proxy import EdgeProxy, located
from portside import headers, proxy
from portside.errors import GatewayError, UpstreamFailed, error_kind
from portside.gateway import relay
from portside.gateway.runtime import GatewayRuntime
from portside.gateway.types import Request, Response
from portside.proxy import ClientGone

log = logging.getLogger(__name__)


class EdgeRouter:
    """The gateway's Router on an edge: a binding's fetch goes as a route's request would,
    with the Portside-* identity headers set by the edge (a handler cannot forge them)."""

    def __init__(self, edge: EdgeProxy) -> None:
        self._edge = edge

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response:
        edge = self._edge
        hint = location_hint or routing.location_hint(request.headers, edge.region)
        pool = name is None
        if name is None:
            name = await edge.pool_member(class_name, hint)
        forward = relay.forward_of(request, add={headers.CLASS: class_name, headers.INSTANCE: name})
        # A pool member counts the request in flight until its answer has been read.
        lease = edge.hold(class_name, name) if pool else None
        try:
            upstream = await edge.open_upstream(forward, class_name, name, hint, pool=pool)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        # A hint the class's constraints moved is said as a route's answer says it, so that a
        # handler returning this response passes it on (a WebSocket's 101 included).
        location = edge.moved_location(class_name, hint)
        if location and isinstance(upstream, proxy.UpstreamSocket):
            upstream = located(upstream, location)
        response = relay.response_of(upstream, lease.release if lease is not None else None)
        if location:
            response.headers[headers.LOCATION] = location
        return response


class GatewayIngress:
    """Answers a gateway route's request: the client's request as a Request (its body
    streaming), the module's fetch under the runtime's deadline and error rules, the response
    streamed back (or its WebSocket bridged). Failures before the answer's head raise
    PortsideError for EdgeProxy to answer (500 gateway-error, 504 gateway-timeout, ...); a
    client that leaves while its body is read is one line of the log, and counted as the
    edge's requests of status 499 are."""

    def __init__(self, edge: EdgeProxy, runtime: GatewayRuntime) -> None:
        self._edge = edge
        self._runtime = runtime

    async def serve(self, client: proxy.Request) -> None:
        with relay.exchange():
            started = time.perf_counter()
            try:
                response = await self._runtime.fetch(relay.request_of(client))
            except ClientGone as exc:
                log.info("gateway: %s %s: %s", client.method, client.path, exc)
                return
            metrics.GATEWAY_SECONDS.observe(time.perf_counter() - started)
            try:
                await relay.answer(client, response, self._edge.core, on_break=_broke_off)
            except GatewayError as exc:
                self._runtime.count_error(error_kind(exc).name)
                raise


def _broke_off(exc: UpstreamFailed) -> None:
    metrics.UPSTREAM_ERRORS.labels("broken").inc()
    log.warning("a response through the gateway broke off: %s", exc)
